// Vector helpers and elementwise math in plain arithmetic the compiler vectorizes, shared by the decoding and
// training kernels (std::exp and std::tanh are scalar libm calls, which keep a loop from vectorizing).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>

constexpr int kLanes = 16;  // floats per vector: one AVX-512 register, two AVX2 ones
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));  // GCC/Clang vector type

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

// Sum of n floats with kLanes partial sums (vector adds, not one serial chain).
inline float sum_of(const float* x, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; i < n; ++i) sum += x[i];
  return sum;
}

// Largest of n floats, kLanes at a time (a scalar std::max loop does not vectorize: it must keep NaN's order).
inline float max_of(const float* x, int64_t n) {
  Vec top;
  for (int j = 0; j < kLanes; ++j) top[j] = -INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec v = load(x + i);
    top = v > top ? v : top;
  }
  float result = -INFINITY;
  for (int j = 0; j < kLanes; ++j) result = std::max(result, top[j]);
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

// e^x = 2^k e^r with k = round(x / ln 2) and |r| <= ln(2) / 2, where a degree-7 Taylor polynomial is
// within 2e-7 relative; 2^k is built in the exponent bits. x is clamped to 80, inside float's range, and
// below -80 e^x is taken as 0 (< 2e-35), so that a -inf score (a masked key) weighs exactly nothing.
inline float exp_approx(float x) {
  const bool vanishes = x < -80.f;
  x = std::min(80.f, std::max(-80.f, x));
  // Adding 1.5 * 2^23 rounds to an integer (std::floor would not vectorize without -ffast-math).
  const float k = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;  // ln 2 in two parts: r stays exact
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r / 5040))))));
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return vanishes ? 0.f : p * scale;
}

// GELU, tanh form (GPT-2's, nn.GELU(approximate="tanh")): 0.5 v (1 + tanh(u)), u = sqrt(2 / pi) (v + 0.044715 v^3).
// With s = 0.5 (1 + tanh(u)) = 1 - 1 / (e^2u + 1), GELU(v) = v s.
constexpr float kGeluC = 0.7978845608f, kGeluA = 0.044715f;

inline float gelu_gate(float v) { return 1.f - 1.f / (exp_approx(2.f * kGeluC * (v + kGeluA * v * v * v)) + 1.f); }

inline float gelu_tanh(float v) { return v * gelu_gate(v); }

// d GELU / dv = s + 0.5 v (1 - tanh(u)^2) u' = s + 2 v s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 v^2).
inline float gelu_tanh_slope(float v) {
  const float s = gelu_gate(v);
  return s + 2.f * v * s * (1.f - s) * kGeluC * (1.f + 3.f * kGeluA * v * v);
}
