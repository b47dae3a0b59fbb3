// Training's elementwise work on CPU in fp32, each in one pass over its data where eager PyTorch makes
// several: GELU and its gradient, dropout and the attention's causal softmax with its dropout (and their gradients),
// and the LM head's exp of a block of logits with its row maxima and sums. Matmuls stay with PyTorch (MKL);
// these are the passes between them, which eager PyTorch makes several times over the same data (docs/benchmarks.md).
// Every loop is split over rows (or chunks of elements) by at::parallel_for, PyTorch's own thread pool.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task at least: smaller tasks cost more to hand out than to run
constexpr int64_t kPiece = 4096;     // elements whose mask bits are made at a time (8 KB)

void check_floats(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              ": expected a contiguous float32 CPU tensor");
}

// Dropout masks: 16 random bits per element (gpt.dropout's rule: kept when >= `lowest`, then scaled by
// `keep`), four elements per 64-bit word. Word w of a mask with seed s is SplitMix64's output mixer (Steele,
// Lea and Flood 2014; Vigna's constants) applied to s + (w + 1) * the golden ratio's 64 bits: a counter-based
// generator, so any thread makes any part of a mask, and the backward pass remakes the forward's mask from its
// seed instead of storing it. torch's generator (mt19937) is sequential: one thread draws the whole mask.
inline uint64_t mask_word(uint64_t seed, uint64_t word) {
  uint64_t z = seed + (word + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The bits of elements [first, first + count) of mask `seed`, made in `scratch`.
const int16_t* mask_bits(uint64_t seed, int64_t first, int64_t count, std::vector<uint64_t>& scratch) {
  const int64_t w0 = first / 4, w1 = (first + count + 3) / 4;
  scratch.resize(w1 - w0);
  uint64_t* words = scratch.data();
  for (int64_t w = w0; w < w1; ++w) words[w - w0] = mask_word(seed, w);
  return reinterpret_cast<const int16_t*>(words) + (first - 4 * w0);  // little-endian: lane k is bits 16k..16k+15
}

// Row kernels, kept out of line: inlined into at::parallel_for's OpenMP region, GCC left some of their loops
// scalar (the attention's softmax with dropout then ran slower on two threads than on one).
#define ROW_KERNEL __attribute__((noinline)) void

ROW_KERNEL gelu_span(const float* __restrict x, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_tanh(x[i]);
}

ROW_KERNEL gelu_grad_span(const float* __restrict grad, const float* __restrict x, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = grad[i] * gelu_tanh_slope(x[i]);
}

// out = x * mask: x where the bits keep it, scaled by `keep`; 0 elsewhere.
ROW_KERNEL masked_span(const float* __restrict x, const int16_t* __restrict bits, int16_t lowest, float keep,
                       float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = bits[i] >= lowest ? x[i] * keep : 0.f;
}

// Query row i of causal attention: its first n = i + 1 raw scores q.k are scaled by `scale` (1 / sqrt(head_dim)),
// softmaxed into `probs`, and that times its dropout mask goes into `dropped`; the keys after it weigh 0.
ROW_KERNEL causal_softmax_dropout_row(const float* __restrict x, float scale, const int16_t* __restrict bits,
                                      int16_t lowest, float keep, float* __restrict probs, float* __restrict dropped,
                                      int64_t n, int64_t row_length) {
  const float top = max_of(x, n) * scale;
  for (int64_t i = 0; i < n; ++i) probs[i] = exp_approx(x[i] * scale - top);
  const float inv = 1.f / sum_of(probs, n);
  for (int64_t i = 0; i < n; ++i) probs[i] *= inv;
  masked_span(probs, bits, lowest, keep, dropped, n);
  std::fill(probs + n, probs + row_length, 0.f);
  std::fill(dropped + n, dropped + row_length, 0.f);
}

// The gradient of row i's raw scores from that of its dropped-out softmax: g = grad * mask, then softmax's own
// backward, probs * (g - sum(g * probs)), times `scale`; 0 for the keys after it.
ROW_KERNEL causal_softmax_dropout_grad_row(const float* __restrict grad, const float* __restrict probs, float scale,
                                           const int16_t* __restrict bits, int16_t lowest, float keep,
                                           float* __restrict out, int64_t n, int64_t row_length) {
  masked_span(grad, bits, lowest, keep, out, n);
  float products[kLanes] = {0.f};  // sum(g * probs) in kLanes partial sums
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) products[j] += out[i + j] * probs[i + j];
  float dot = 0.f;
  for (int j = 0; j < kLanes; ++j) dot += products[j];
  for (; i < n; ++i) dot += out[i] * probs[i];
  for (i = 0; i < n; ++i) out[i] = probs[i] * (out[i] - dot) * scale;
  std::fill(out + n, out + row_length, 0.f);
}

// A row of logits becomes exp(logits - their maximum) in place; its maximum and the sum of the exps are kept.
ROW_KERNEL exp_row(float* __restrict x, float* top, float* total, int64_t n) {
  *top = max_of(x, n);
  const float shift = *top;
  for (int64_t i = 0; i < n; ++i) x[i] = exp_approx(x[i] - shift);
  *total = sum_of(x, n);
}

torch::Tensor gelu_forward(const torch::Tensor& x) {
  check_floats(x, "gelu_forward");
  auto y = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), kGrain, [=](int64_t begin, int64_t end) {
    gelu_span(in + begin, out + begin, end - begin);
  });
  return y;
}

torch::Tensor gelu_backward(const torch::Tensor& grad, const torch::Tensor& x) {
  check_floats(grad, "gelu_backward");
  check_floats(x, "gelu_backward");
  TORCH_CHECK(grad.sizes() == x.sizes(), "gelu_backward: grad and input differ in shape");
  auto dx = torch::empty_like(x);
  const float *g = grad.data_ptr<float>(), *in = x.data_ptr<float>();
  float* out = dx.data_ptr<float>();
  at::parallel_for(0, x.numel(), kGrain, [=](int64_t begin, int64_t end) {
    gelu_grad_span(g + begin, in + begin, out + begin, end - begin);
  });
  return dx;
}

// x times mask `seed`'s scale (the forward pass), or a gradient times it (the backward pass: the same mask).
torch::Tensor dropout(const torch::Tensor& x, int64_t seed, int64_t lowest_kept, double scale) {
  check_floats(x, "dropout");
  auto y = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), kGrain, [=](int64_t begin, int64_t end) {
    std::vector<uint64_t> scratch;
    for (int64_t start = begin; start < end; start += kPiece) {  // bits made a piece at a time, while in L1
      const int64_t count = std::min(kPiece, end - start);
      masked_span(in + start, mask_bits(seed, start, count, scratch), lowest_kept, scale, out + start, count);
    }
  });
  return y;
}

void check_square(const torch::Tensor& t, const char* name) {
  check_floats(t, name);
  TORCH_CHECK(t.dim() >= 2 && t.size(-1) == t.size(-2), name, ": expected (..., queries, keys) with as many of each");
}

// Causal self-attention's raw scores (..., n, n) -> (softmax of the scaled scores, each query seeing the keys up
// to its own; that times dropout mask `seed`). The mask's bits are element-indexed, so any thread makes any row's;
// the keys a query cannot see need none (their weights are 0 either way), and their exps are not computed:
// about half of each (n x n) tile. No mask tensor is added to the scores in a pass of its own.
std::vector<torch::Tensor> causal_softmax_dropout_forward(const torch::Tensor& scores, double scale, int64_t seed,
                                                          int64_t lowest_kept, double keep) {
  check_square(scores, "causal_softmax_dropout_forward");
  const int64_t n = scores.size(-1), rows = scores.numel() / n;
  auto probs = torch::empty_like(scores), dropped = torch::empty_like(scores);
  const float* s = scores.data_ptr<float>();
  float *p = probs.data_ptr<float>(), *d = dropped.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [=](int64_t begin, int64_t end) {
    std::vector<uint64_t> scratch;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t seen = row % n + 1;
      causal_softmax_dropout_row(s + row * n, scale, mask_bits(seed, row * n, seen, scratch), lowest_kept, keep,
                                 p + row * n, d + row * n, seen, n);
    }
  });
  return {probs, dropped};
}

// The raw scores' gradient from that of the dropped-out softmax (probs and the mask's seed as the forward pass
// had them).
torch::Tensor causal_softmax_dropout_backward(const torch::Tensor& grad, const torch::Tensor& probs, double scale,
                                              int64_t seed, int64_t lowest_kept, double keep) {
  check_square(grad, "causal_softmax_dropout_backward");
  check_square(probs, "causal_softmax_dropout_backward");
  TORCH_CHECK(grad.sizes() == probs.sizes(), "causal_softmax_dropout_backward: grad and probs differ in shape");
  const int64_t n = probs.size(-1), rows = probs.numel() / n;
  auto dscores = torch::empty_like(probs);
  const float *g = grad.data_ptr<float>(), *p = probs.data_ptr<float>();
  float* out = dscores.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [=](int64_t begin, int64_t end) {
    std::vector<uint64_t> scratch;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t seen = row % n + 1;
      causal_softmax_dropout_grad_row(g + row * n, p + row * n, scale, mask_bits(seed, row * n, seen, scratch),
                                      lowest_kept, keep, out + row * n, seen, n);
    }
  });
  return dscores;
}

// The 16-bit words of mask `seed` for `count` elements (for tests: the reference computations use them).
torch::Tensor mask_bits_of(int64_t seed, int64_t count) {
  auto bits = torch::empty({count}, torch::kInt16);
  std::vector<uint64_t> scratch;
  std::memcpy(bits.data_ptr<int16_t>(), mask_bits(seed, 0, count, scratch), count * sizeof(int16_t));
  return bits;
}

// A block of logits (rows x columns) becomes exp(logits - its row maxima) in place; returns the row
// maxima and the row sums of those exps, each (rows, 1).
std::vector<torch::Tensor> exp_rows_(torch::Tensor block) {
  check_floats(block, "exp_rows_");
  TORCH_CHECK(block.dim() == 2, "exp_rows_: expected a 2-d block");
  const int64_t rows = block.size(0), n = block.size(1);
  auto tops = torch::empty({rows, 1}, block.options()), sums = torch::empty({rows, 1}, block.options());
  float *x = block.data_ptr<float>(), *t = tops.data_ptr<float>(), *s = sums.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) exp_row(x + row * n, t + row, s + row, n);
  });
  return {tops, sums};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gelu_forward", &gelu_forward, "GELU (tanh form) of a float32 tensor");
  m.def("gelu_backward", &gelu_backward, "the gradient of GELU's input from its output's");
  m.def("dropout", &dropout, "x times dropout mask `seed` (kept elements scaled)");
  m.def("causal_softmax_dropout_forward", &causal_softmax_dropout_forward,
        "(causal softmax, dropped-out causal softmax) of raw attention scores");
  m.def("causal_softmax_dropout_backward", &causal_softmax_dropout_backward,
        "the raw scores' gradient from the dropped-out causal softmax's");
  m.def("mask_bits", &mask_bits_of, "the int16 random bits of dropout mask `seed` for `count` elements");
  m.def("exp_rows_", &exp_rows_, "exp(block - row maxima) in place; (row maxima, row sums of the exps)");
}
