// y = x @ W^T (+ bias) with W kept compact in memory: bfloat16, or int8 with one scale per output row.
//
// A decode step at small batch reads every weight once per token, so it runs at the memory's speed:
// fewer bytes per weight is the whole game. PyTorch has no fast path for these on CPUs without
// native bf16 / int8 dot products (AVX2): bf16 F.linear runs 10-50x slower than float32 there, and
// int8 weights are dequantized whole on every call. Here each weight row is widened to float32 in
// registers and never written back; the math is float32 with float32 accumulation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

using namespace genserve_simd;

constexpr int kRows = 4;  // weight rows per inner loop: each x vector loaded once feeds 4 FMAs
constexpr int kCols = 2;  // activation rows per inner loop: each widened weight vector feeds 2 FMAs

// out[m, n] = sum_k x[m, k] * w[n, k] for n in [n0, n0 + kRows), m in [m0, m0 + cols); K % W == 0
template <typename weight_t, int cols>
inline void tile(const float* x, const weight_t* w, int64_t K, int64_t n0, int64_t m0, float* acc_out) {
  vfloat acc[kRows][cols];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < cols; ++c) acc[r][c] = vfloat{};
  const weight_t* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = w + (n0 + r) * K;
  const float* xs[cols];
  for (int c = 0; c < cols; ++c) xs[c] = x + (m0 + c) * K;
  for (int64_t k = 0; k < K; k += W) {
    vfloat xv[cols];
    for (int c = 0; c < cols; ++c) xv[c] = loadv(xs[c] + k);
    for (int r = 0; r < kRows; ++r) {
      const vfloat wv = loadv(rows[r] + k);
      for (int c = 0; c < cols; ++c) acc[r][c] += wv * xv[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < cols; ++c) acc_out[r * kCols + c] = hsum(acc[r][c]);
}

template <typename weight_t, typename out_t>
void linear_rows(const float* x, const weight_t* w, const float* scale, const float* bias, out_t* out,
                 int64_t M, int64_t N, int64_t K) {
  // split the output features across threads: each reads its own weight rows once per step
  const int64_t num_tiles = N / kRows;
  at::parallel_for(0, num_tiles, 16, [&](int64_t begin, int64_t end) {
    float acc[kRows * kCols];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kRows;
      for (int64_t m0 = 0; m0 < M; m0 += kCols) {
        const int cols = static_cast<int>(std::min<int64_t>(kCols, M - m0));
        if (cols == kCols) {
          tile<weight_t, kCols>(x, w, K, n0, m0, acc);
        } else {
          tile<weight_t, 1>(x, w, K, n0, m0, acc);
        }
        for (int r = 0; r < kRows; ++r) {
          const int64_t n = n0 + r;
          const float s = scale ? scale[n] : 1.f;
          const float b = bias ? bias[n] : 0.f;
          for (int c = 0; c < cols; ++c) out[(m0 + c) * N + n] = static_cast<out_t>(acc[r * kCols + c] * s + b);
        }
      }
    }
  });
}

// x: [M, K] float32 or bfloat16; weight: [N, K] bfloat16 or int8; scale: [N] (int8 only); bias: [N]
// -> [M, N] in x's dtype. K must be a multiple of the vector width and N of 4 (true of real models;
// the caller falls back to PyTorch otherwise).
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [M, K], weight [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % W == 0 && N % kRows == 0, "weight_only_linear: K must be a multiple of ", W, " and N of ", kRows);
  const bool is_int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(is_int8 || weight.scalar_type() == at::kBFloat16, "weight: int8 or bfloat16");
  TORCH_CHECK(is_int8 == scale.has_value(), "a per-row scale goes with int8 weights, and only with them");
  auto w = weight.contiguous();
  auto xf = x.to(at::kFloat).contiguous();
  at::Tensor scale_f, bias_f;
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == N, "scale: one per output row");
    scale_f = scale->to(at::kFloat).contiguous();
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias: one per output row");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* s = scale_f.defined() ? scale_f.data_ptr<float>() : nullptr;
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    float* o = out.data_ptr<float>();
    if (is_int8) linear_rows(xp, w.data_ptr<int8_t>(), s, b, o, M, N, K);
    else linear_rows(xp, w.data_ptr<c10::BFloat16>(), s, b, o, M, N, K);
  } else {
    c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
    if (is_int8) linear_rows(xp, w.data_ptr<int8_t>(), s, b, o, M, N, K);
    else linear_rows(xp, w.data_ptr<c10::BFloat16>(), s, b, o, M, N, K);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve_cpu, m) {
  m.def("weight_only_linear(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) {
  m.impl("weight_only_linear", &weight_only_linear);
}
