// One decoding step of gpt.model.GPTModel on CPU in fp32, in a single call, for a batch of rows (one new
// token each): embedding, every block (LayerNorm, q/k/v, attention over the KV cache, output projection,
// MLP) and the head. A step reads every weight once whatever the batch, so at batch 1 its speed limit
// is memory bandwidth. PyTorch's eager path falls short of it: a one-row matmul runs MKL's sgemv on one
// thread, a few-row one streams weights well below the bandwidth, and each of the 330 ops of a gpt2-small
// step costs dispatch time (measured: docs/benchmarks.md).
// Here the step runs inside one OpenMP parallel region (PyTorch's own thread pool): weight rows and
// (row, head) pairs are split across threads, each weight is read from memory once for the whole batch,
// the small vector work (norms) is split by batch row, and the GELU and softmax use a vectorizable exp.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int kChains = 4;  // independent accumulators per row, so loads never wait on an add

// This thread's share [begin, end) of n items, in one contiguous block (one stream per core is
// what the hardware prefetcher follows best).
void my_share(int64_t n, int64_t* begin, int64_t* end) {
  const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
  const int64_t chunk = (n + threads - 1) / threads;
  *begin = std::min(n, id * chunk);
  *end = std::min(n, *begin + chunk);
}

// W[r] . x with four accumulator chains, so loads never wait on an add: one chain cannot keep up with
// memory (docs/benchmarks.md).
inline float dot(const float* row, const float* x, int64_t cols) {
  Vec acc[kChains] = {};
  int64_t c = 0;
  for (; c + kChains * kLanes <= cols; c += kChains * kLanes)
    for (int k = 0; k < kChains; ++k) acc[k] += load(row + c + k * kLanes) * load(x + c + k * kLanes);
  for (; c + kLanes <= cols; c += kLanes) acc[0] += load(row + c) * load(x + c);
  for (int k = 1; k < kChains; ++k) acc[0] += acc[k];
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += acc[0][j];
  for (; c < cols; ++c) sum += row[c] * x[c];
  return sum;
}

// Several inputs: the inputs go across the lanes of a vector, eight at a time, so one multiply-add
// takes one weight (broadcast) times the same column of eight inputs, and a tile of kRowTile weight
// rows keeps kRowTile accumulators, each already eight outputs: no sums across lanes, and every weight
// is read once per eight inputs. This keeps the multiply-add units far busier than four weight rows by
// four inputs in the dot form above, which needs a sum across lanes per output and four loads of every
// row chunk (docs/benchmarks.md).
constexpr int kGroup = 8;  // inputs per vector: eight floats, a 256-bit register (two multiply-adds a cycle)
// Weight rows per tile, each a stream from memory: 8 was the fastest of 4, 8, 12 and 16 (docs/benchmarks.md).
constexpr int kRowTile = 8;
typedef float Group __attribute__((vector_size(kGroup * sizeof(float))));

// xt[k * kGroup + i] = x[(first + i) * cols + k] for the group of inputs from `first` (zeros past n).
void transpose_group(const float* x, int64_t n, int64_t first, int64_t cols, float* xt) {
  std::fill_n(xt, cols * kGroup, 0.f);
  for (int64_t i = 0; i < kGroup && first + i < n; ++i)
    for (int64_t k = 0; k < cols; ++k) xt[k * kGroup + i] = x[(first + i) * cols + k];
}

// out[j][i] = W[j] . x[i] for R weight rows (`cols` floats apart) and a transposed group xt.
template <int R>
inline void group_tile(const float* w, const float* xt, int64_t cols, Group out[R]) {
  Group acc[R] = {};
  constexpr int64_t kLineFloats = 64 / sizeof(float);
  for (int64_t start = 0; start < cols; start += kLineFloats) {
    // The next tile's rows, line by line as this tile reads its own (one tile ahead).
    for (int j = 0; j < R; ++j) __builtin_prefetch(w + (R + j) * cols + start);
    for (int64_t k = start; k < std::min(cols, start + kLineFloats); ++k) {
      Group xs;
      std::memcpy(&xs, xt + k * kGroup, sizeof xs);
      for (int j = 0; j < R; ++j) acc[j] += xs * w[j * cols + k];
    }
  }
  std::copy_n(acc, R, out);
}

// y[i][r] = add[i][r] + (W[r] . x[i] + b[r]) for the n inputs x[i] (rows of `cols` floats) and the weight
// rows [begin, end); y and add hold `rows` floats per input; b and add may be null, and add may be y
// itself (a residual update in place): y[i][r] reads add[i][r] only. From four inputs on, the weights
// are read once per group of eight (group_tile); fewer take the four-chain dot, one input at a time,
// the later ones finding the rows in cache.
void matvec_rows(const float* w, const float* x, int64_t n, const float* b, const float* add, float* y,
                 int64_t cols, int64_t rows, int64_t begin, int64_t end) {
  auto store = [&](int64_t r, int64_t i, float sum) {
    y[i * rows + r] = (add ? add[i * rows + r] : 0.f) + (sum + (b ? b[r] : 0.f));
  };
  if (n < 4) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < n; ++i) store(r, i, dot(w + r * cols, x + i * cols, cols));
    return;
  }
  // Each thread transposes all the inputs for itself (a few KB): cheaper than a barrier to share them.
  thread_local std::vector<float> xt;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  xt.resize(groups * cols * kGroup);
  for (int64_t g = 0; g < groups; ++g) transpose_group(x, n, g * kGroup, cols, xt.data() + g * cols * kGroup);
  Group acc[kRowTile];
  for (int64_t r = begin; r < end; r += kRowTile) {
    const int64_t tile = std::min<int64_t>(kRowTile, end - r);
    for (int64_t g = 0; g < groups; ++g) {
      const float* group = xt.data() + g * cols * kGroup;
      if (tile == kRowTile)
        group_tile<kRowTile>(w + r * cols, group, cols, acc);
      else
        for (int64_t j = 0; j < tile; ++j) group_tile<1>(w + (r + j) * cols, group, cols, acc + j);
      for (int64_t j = 0; j < tile; ++j)
        for (int64_t i = 0; i < kGroup && g * kGroup + i < n; ++i) store(r + j, g * kGroup + i, acc[j][i]);
    }
  }
}

void layer_norm(const float* x, const float* w, const float* b, float* out, int64_t n, float eps) {
  const float mean = sum_of(x, n) / n;
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * (x[i] - mean);
  const float inv = 1.f / std::sqrt(sum_of(out, n) / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// GELU (vector_math.h) over n values in place.
void gelu_in_place(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_tanh(x[i]);
}

const float* data_or_null(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

struct Block {
  torch::Tensor norm1_w, norm1_b, qkv_w, qkv_b, out_w, out_b, norm2_w, norm2_b, fc_w, fc_b, proj_w, proj_b;
};

}  // namespace

class Decoder {
 public:
  // tensors: tok_emb, pos_emb, then per block norm1 w/b, qkv w/b, out_proj w/b, norm2 w/b, fc w/b,
  // proj w/b, then final norm w/b and head w/b; an absent bias is an empty tensor. The head's first
  // head_rows rows are computed (a padded vocabulary's extra rows are never predicted).
  Decoder(const std::vector<torch::Tensor>& tensors, int64_t n_heads, int64_t head_rows, double eps)
      : n_heads_(n_heads), head_rows_(head_rows), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(tensors.size() >= 6 && (tensors.size() - 6) % 12 == 0,
                "Decoder: expected 2 embeddings + 12 tensors per block + 4 head tensors, got ", tensors.size());
    for (const auto& t : tensors)
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                  "Decoder: every weight must be a contiguous float32 CPU tensor");
    tok_emb_ = tensors[0];
    pos_emb_ = tensors[1];
    emb_ = tok_emb_.size(1);
    TORCH_CHECK(n_heads > 0 && emb_ % n_heads == 0, "Decoder: emb_dim ", emb_, " is not divisible by n_heads ", n_heads);
    const size_t n_blocks = (tensors.size() - 6) / 12;
    for (size_t i = 0; i < n_blocks; ++i) {
      const torch::Tensor* t = &tensors[2 + 12 * i];
      blocks_.push_back({t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11]});
    }
    const torch::Tensor* t = &tensors[tensors.size() - 4];
    final_w_ = t[0], final_b_ = t[1], head_w_ = t[2], head_b_ = t[3];
    hidden_ = blocks_.empty() ? 0 : blocks_[0].fc_w.size(0);
    for (const auto& b : blocks_) {
      check_linear(b.qkv_w, b.qkv_b, 3 * emb_, emb_, "qkv");
      check_linear(b.out_w, b.out_b, emb_, emb_, "out_proj");
      check_linear(b.fc_w, b.fc_b, hidden_, emb_, "fc");
      check_linear(b.proj_w, b.proj_b, emb_, hidden_, "proj");
      for (const auto* n : {&b.norm1_w, &b.norm1_b, &b.norm2_w, &b.norm2_b})
        TORCH_CHECK(n->numel() == emb_, "Decoder: a LayerNorm does not have emb_dim elements");
    }
    TORCH_CHECK(pos_emb_.dim() == 2 && pos_emb_.size(1) == emb_, "Decoder: pos_emb is not (context, emb_dim)");
    TORCH_CHECK(head_rows_ > 0 && head_rows_ <= head_w_.size(0), "Decoder: head_rows out of range");
    check_linear(head_w_, head_b_, head_w_.size(0), emb_, "head");
  }

  // Logits (batch, 1, head_rows) for one token per batch row, `tokens` (batch,) int64, at cache slot
  // `slot`: each row's keys and values are written into that slot of each layer's cache (batch, n_heads,
  // context, head_dim), and slots pad[b]..slot are read (pad (batch,) int64, row b's left padding, or
  // empty for none); row b's token is at position slot - pad[b].
  torch::Tensor step(const torch::Tensor& tokens, int64_t slot, const torch::Tensor& pad,
                     const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values) {
    const int64_t head_dim = emb_ / n_heads_, context = pos_emb_.size(0);
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == torch::kInt64 && tokens.device().is_cpu(),
                "Decoder.step: tokens must be a 1-d int64 CPU tensor");
    const int64_t batch = tokens.size(0);
    TORCH_CHECK(batch > 0, "Decoder.step: no tokens");
    TORCH_CHECK(pad.numel() == 0 || (pad.dim() == 1 && pad.size(0) == batch && pad.scalar_type() == torch::kInt64 &&
                                     pad.device().is_cpu()),
                "Decoder.step: pad must be empty or a (batch,) int64 CPU tensor");
    TORCH_CHECK(slot >= 0 && slot < context, "Decoder.step: slot ", slot, " outside the context of ", context);
    TORCH_CHECK(keys.size() == blocks_.size() && values.size() == blocks_.size(), "Decoder.step: one cache per block");
    for (const auto* caches : {&keys, &values})
      for (const auto& c : *caches)
        TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == torch::kFloat32 && c.is_contiguous() &&
                        c.dim() == 4 && c.size(0) == batch && c.size(1) == n_heads_ && c.size(2) > slot &&
                        c.size(3) == head_dim,
                    "Decoder.step: caches must be contiguous float32 CPU tensors (batch, n_heads, > slot, head_dim)");
    const auto ids = tokens.contiguous();
    std::vector<int64_t> first(batch, 0);  // each row's first real slot
    for (int64_t r = 0; r < batch; ++r) {
      const int64_t token = ids.data_ptr<int64_t>()[r];
      TORCH_CHECK(token >= 0 && token < tok_emb_.size(0), "Decoder.step: token id ", token, " out of range");
      if (pad.numel()) first[r] = pad.contiguous().data_ptr<int64_t>()[r];
      TORCH_CHECK(first[r] >= 0 && first[r] <= slot, "Decoder.step: row ", r, " has padding ", first[r],
                  " beyond slot ", slot);
    }
    c10::InferenceMode guard;
    auto logits = torch::empty({batch, 1, head_rows_}, tok_emb_.options());
    std::vector<float> x(batch * emb_), normed(batch * emb_), qkv(batch * 3 * emb_), attended(batch * emb_),
        hidden(batch * hidden_), scores(batch * n_heads_ * (slot + 1));
    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
    const int64_t cache_len = keys.empty() ? 0 : keys[0].size(2);

#pragma omp parallel num_threads(at::get_num_threads())
    {
      int64_t begin, end;
#pragma omp for
      for (int64_t r = 0; r < batch; ++r) {
        const float* tok = tok_emb_.data_ptr<float>() + ids.data_ptr<int64_t>()[r] * emb_;
        const float* where = pos_emb_.data_ptr<float>() + (slot - first[r]) * emb_;
        for (int64_t i = 0; i < emb_; ++i) x[r * emb_ + i] = tok[i] + where[i];
      }
      for (size_t layer = 0; layer < blocks_.size(); ++layer) {
        const Block& b = blocks_[layer];
#pragma omp for
        for (int64_t r = 0; r < batch; ++r)
          layer_norm(x.data() + r * emb_, b.norm1_w.data_ptr<float>(), b.norm1_b.data_ptr<float>(),
                     normed.data() + r * emb_, emb_, eps_);
        my_share(3 * emb_, &begin, &end);
        matvec_rows(b.qkv_w.data_ptr<float>(), normed.data(), batch, data_or_null(b.qkv_b), nullptr, qkv.data(),
                    emb_, 3 * emb_, begin, end);
#pragma omp barrier
        my_share(batch * n_heads_, &begin, &end);
        for (int64_t pair = begin; pair < end; ++pair) {
          const int64_t r = pair / n_heads_, h = pair % n_heads_;
          const float* row_qkv = qkv.data() + r * 3 * emb_;
          const float* q = row_qkv + h * head_dim;
          // Row r's head h: keys (values) are rows of head_dim floats, one per slot, cache_len slots.
          float* k_cache = keys[layer].data_ptr<float>() + pair * cache_len * head_dim;
          float* v_cache = values[layer].data_ptr<float>() + pair * cache_len * head_dim;
          std::copy_n(row_qkv + emb_ + h * head_dim, head_dim, k_cache + slot * head_dim);
          std::copy_n(row_qkv + 2 * emb_ + h * head_dim, head_dim, v_cache + slot * head_dim);
          const int64_t from = first[r], n = slot + 1 - from;  // the row's slots, padding skipped
          float* s = scores.data() + pair * (slot + 1);
          matvec_rows(k_cache + from * head_dim, q, 1, nullptr, nullptr, s, head_dim, n, 0, n);  // keys times q
          float top = -INFINITY;
          for (int64_t t = 0; t < n; ++t) top = std::max(top, s[t] *= scale);
          float total = 0.f;
          for (int64_t t = 0; t < n; ++t) total += (s[t] = exp_approx(s[t] - top));
          float* out = attended.data() + r * emb_ + h * head_dim;
          std::fill_n(out, head_dim, 0.f);
          for (int64_t t = 0; t < n; ++t) {
            const float p = s[t] / total;
            const float* v = v_cache + (from + t) * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) out[d] += p * v[d];
          }
        }
#pragma omp barrier
        my_share(emb_, &begin, &end);
        matvec_rows(b.out_w.data_ptr<float>(), attended.data(), batch, data_or_null(b.out_b), x.data(), x.data(),
                    emb_, emb_, begin, end);
#pragma omp barrier
#pragma omp for
        for (int64_t r = 0; r < batch; ++r)
          layer_norm(x.data() + r * emb_, b.norm2_w.data_ptr<float>(), b.norm2_b.data_ptr<float>(),
                     normed.data() + r * emb_, emb_, eps_);
        my_share(hidden_, &begin, &end);
        matvec_rows(b.fc_w.data_ptr<float>(), normed.data(), batch, data_or_null(b.fc_b), nullptr, hidden.data(),
                    emb_, hidden_, begin, end);
        for (int64_t r = 0; r < batch; ++r) gelu_in_place(hidden.data() + r * hidden_ + begin, end - begin);
#pragma omp barrier
        my_share(emb_, &begin, &end);
        matvec_rows(b.proj_w.data_ptr<float>(), hidden.data(), batch, data_or_null(b.proj_b), x.data(), x.data(),
                    hidden_, emb_, begin, end);
#pragma omp barrier
      }
#pragma omp for
      for (int64_t r = 0; r < batch; ++r)
        layer_norm(x.data() + r * emb_, final_w_.data_ptr<float>(), final_b_.data_ptr<float>(),
                   normed.data() + r * emb_, emb_, eps_);
      my_share(head_rows_, &begin, &end);
      matvec_rows(head_w_.data_ptr<float>(), normed.data(), batch, data_or_null(head_b_), nullptr,
                  logits.data_ptr<float>(), emb_, head_rows_, begin, end);
    }
    return logits;
  }

 private:
  static void check_linear(const torch::Tensor& w, const torch::Tensor& b, int64_t rows, int64_t cols,
                           const char* name) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, "Decoder: ", name, " weight has shape ",
                w.sizes(), ", expected (", rows, ", ", cols, ")");
    TORCH_CHECK(b.numel() == 0 || b.numel() == rows, "Decoder: ", name, " bias has ", b.numel(), " elements, expected ",
                rows);
  }

  int64_t n_heads_, head_rows_, emb_ = 0, hidden_ = 0;
  float eps_;
  torch::Tensor tok_emb_, pos_emb_, final_w_, final_b_, head_w_, head_b_;
  std::vector<Block> blocks_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder", pybind11::module_local())
      .def(pybind11::init<const std::vector<torch::Tensor>&, int64_t, int64_t, double>())
      .def("step", &Decoder::step, "logits (batch, 1, head_rows) of one token per row; writes their keys/values into the caches");
}
