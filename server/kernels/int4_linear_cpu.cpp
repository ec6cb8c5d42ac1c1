// y = x @ W^T (+ bias) with W kept as 4-bit (or 8-bit) integers in groups: w[n, k] = q[n, k] * scale[n, g] + min[n, g],
// g = k / group_size. The layout GPTQ, AWQ and GGUF Q4_0 / Q4_1 share once their packing is undone
// (a zero point z is min = -z * scale; Q4_0 is z = 8).
//
// Packed weight [N, K / 2] uint8, per output row blocks of 32 values in 16 bytes: byte j holds value j in
// its low nibble and value j + 16 in its high nibble (GGUF's own block order, so its blocks copy as they are).
//
// Decode steps read every weight once per token, so they run at the memory's speed: 4 bits per weight
// instead of 32 is what counts. Nibbles are widened to float32 in registers and never written back; per
// group, sum(x * q) is scaled once and the min term is min * sum(x), so the inner loop is one FMA per weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using namespace genserve_simd;

constexpr int kBlock = 32;  // values per packed block (16 bytes)

// the 32 values of one block as four float vectors of 8 (AVX2) or two of 16 (AVX-512)
inline void widen_block(const int8_t* p, vfloat* out) {  // 8-bit weights (GGUF Q8_0): 32 bytes
  for (int v = 0; v < kBlock / W; ++v) out[v] = loadv(p + v * W);
}
inline void widen_block(const uint8_t* p, vfloat* out) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask);                     // values 0..15
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);  // values 16..31
  out[0] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)));
  out[1] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))));
  out[2] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)));
  out[3] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))));
#else
  float tmp[kBlock];
  for (int j = 0; j < 16; ++j) {
    tmp[j] = static_cast<float>(p[j] & 0x0F);
    tmp[j + 16] = static_cast<float>(p[j] >> 4);
  }
  for (int v = 0; v < kBlock / W; ++v) out[v] = loadv(tmp + v * W);
#endif
}

// acc[r * cols + c] = sum_g scale[n0 + r, g] * sum_{k in g} x[m0 + c, k] * q[n0 + r, k]
template <int rows, int cols, typename weight_t, typename scale_t>
inline void tile(const float* x, const weight_t* qw, const scale_t* scale, int64_t K, int64_t G,
                 int64_t num_groups, int64_t n0, int64_t m0, float* acc_out) {
  constexpr int V = kBlock / W;  // float vectors per block
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;  // values per byte
  vfloat acc[rows][cols];
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) acc[r][c] = vfloat{};
  const float* xs[cols];
  for (int c = 0; c < cols; ++c) xs[c] = x + (m0 + c) * K;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t k_end = std::min(K, (g + 1) * G);
    vfloat part[rows][cols];
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) part[r][c] = vfloat{};
    for (int64_t k = g * G; k < k_end; k += kBlock) {
      for (int r = 0; r < rows; ++r) {
        vfloat wv[V];
        widen_block(qw + (n0 + r) * (K / kPacking) + k / kPacking, wv);
        for (int v = 0; v < V; ++v)
          for (int c = 0; c < cols; ++c) part[r][c] += wv[v] * loadv(xs[c] + k + v * W);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const float s = widen(scale[(n0 + r) * num_groups + g]);
      for (int c = 0; c < cols; ++c) acc[r][c] += part[r][c] * s;
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) acc_out[r * cols + c] = hsum(acc[r][c]);
}

// sum_g mins[g] * xsum[g]: the min term of one output
inline float min_term(const float* mins, const float* xsum, int64_t num_groups) {
  float total = 0.f;
  for (int64_t g = 0; g < num_groups; ++g) total += mins[g] * xsum[g];
  return total;
}
inline float min_term(const c10::Half* mins, const float* xsum, int64_t num_groups) {
  float total = 0.f;
  int64_t g = 0;
#if defined(__F16C__) && defined(__AVX2__) && !defined(__AVX512F__)
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= num_groups; g += 8) {
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g)));
    acc = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + g), acc);
  }
  total = hsum(reinterpret_cast<vfloat>(acc));
#endif
  for (; g < num_groups; ++g) total += widen(mins[g]) * xsum[g];
  return total;
}

template <int rows, int cols, typename weight_t, typename scale_t, typename out_t>
void run_tile(const float* x, const float* xsum, const weight_t* qw, const scale_t* scale, const scale_t* mins,
              const float* bias, out_t* out, int64_t N, int64_t K, int64_t G, int64_t num_groups, int64_t n0,
              int64_t m0) {
  float acc[rows * cols];
  tile<rows, cols>(x, qw, scale, K, G, num_groups, n0, m0, acc);
  for (int r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const float b = bias ? bias[n] : 0.f;
    for (int c = 0; c < cols; ++c) {
      const float total = acc[r * cols + c] + min_term(mins + n * num_groups, xsum + (m0 + c) * num_groups, num_groups);
      out[(m0 + c) * N + n] = static_cast<out_t>(total + b);
    }
  }
}

template <typename weight_t, typename scale_t, typename out_t>
void grouped_rows(const float* x, const float* xsum, const weight_t* qw, const scale_t* scale, const scale_t* mins,
               const float* bias, out_t* out, int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t num_groups = (K + G - 1) / G;
  // one row alone: 4 weight rows share each x load; batches: 2 x 2 tiles keep the accumulators in registers
  const int64_t rows_per_task = M == 1 ? 4 : 2;
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  at::parallel_for(0, N / rows_per_task, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * rows_per_task;
      if (M == 1) {
        prefetch_bytes(qw + (n0 + 2 * rows_per_task) * (K / kPacking), t + 2 < end ? rows_per_task * K / kPacking : 0);
        run_tile<4, 1>(x, xsum, qw, scale, mins, bias, out, N, K, G, num_groups, n0, 0);
        continue;
      }
      int64_t m0 = 0;
      for (; m0 + 2 <= M; m0 += 2)
        run_tile<2, 2>(x, xsum, qw, scale, mins, bias, out, N, K, G, num_groups, n0, m0);
      if (m0 < M) run_tile<2, 1>(x, xsum, qw, scale, mins, bias, out, N, K, G, num_groups, n0, m0);
    }
  });
}

// Batches (M >= kPanelMinRows): the widening would repeat for every pair of activation rows, so a panel of
// kPanel weight rows is dequantized once into float32 (w = q * scale + min: the exact float weight, one
// rounding) in a buffer that stays in L1/L2, and a register-tiled dot product runs over it: 4 weight rows x 3
// activation rows, 12 accumulators, 7 loads per 12 FMAs, so the FMA units set the pace, not the widening.
constexpr int64_t kPanel = 16;
constexpr int64_t kPanelMinRows = 2;

template <typename weight_t, typename scale_t>
inline void dequantize_row(const weight_t* q, const scale_t* scale, const scale_t* mins, int64_t K, int64_t G,
                           float* w) {
  constexpr int V = kBlock / W;
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  for (int64_t k = 0; k < K; k += kBlock) {
    const int64_t g = k / G;
    const vfloat s = vfloat{} + widen(scale[g]);
    const vfloat m = vfloat{} + widen(mins[g]);
    vfloat wv[V];
    widen_block(q + k / kPacking, wv);
    for (int v = 0; v < V; ++v) {
      const vfloat value = wv[v] * s + m;
      std::memcpy(w + k + v * W, &value, sizeof(value));
    }
  }
}

// out[m0 + c, n0 + r] = dot(x[m0 + c], w[r]) + bias, r < rows, c < cols
template <int rows, int cols, typename out_t>
inline void dot_tile(const float* x, const float* w, const float* bias, out_t* out, int64_t N, int64_t K,
                     int64_t n0, int64_t m0) {
  vfloat acc[rows][cols];
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) acc[r][c] = vfloat{};
  for (int64_t k = 0; k < K; k += W) {
    vfloat xv[cols];
    for (int c = 0; c < cols; ++c) xv[c] = loadv(x + (m0 + c) * K + k);
    for (int r = 0; r < rows; ++r) {
      const vfloat wv = loadv(w + r * K + k);
      for (int c = 0; c < cols; ++c) acc[r][c] += wv * xv[c];
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float b = bias ? bias[n0 + r] : 0.f;
    for (int c = 0; c < cols; ++c) out[(m0 + c) * N + n0 + r] = static_cast<out_t>(hsum(acc[r][c]) + b);
  }
}

template <typename weight_t, typename scale_t, typename out_t>
void grouped_panels(const float* x, const weight_t* qw, const scale_t* scale, const scale_t* mins, const float* bias,
                    out_t* out, int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t num_groups = (K + G - 1) / G;
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kPanel * K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kPanel, p_rows = std::min(kPanel, N - p0);
      for (int64_t r = 0; r < p_rows; ++r)
        dequantize_row(qw + (p0 + r) * (K / kPacking), scale + (p0 + r) * num_groups, mins + (p0 + r) * num_groups,
                       K, G, panel.data() + r * K);
      for (int64_t r = 0; r < p_rows; r += 4) {  // N % 4 == 0
        const float* w = panel.data() + r * K;
        int64_t m0 = 0;
        for (; m0 + 3 <= M; m0 += 3) dot_tile<4, 3>(x, w, bias, out, N, K, p0 + r, m0);
        if (M - m0 == 2) dot_tile<4, 2>(x, w, bias, out, N, K, p0 + r, m0);
        else if (M - m0 == 1) dot_tile<4, 1>(x, w, bias, out, N, K, p0 + r, m0);
      }
    }
  });
}

// x: [M, K] float32 or bfloat16; qweight: [N, K / 2] uint8 (4-bit, layout above) or [N, K] int8 (8-bit);
// scale, min: [N, ceil(K / G)] float32 or float16 (both the same); bias: [N] -> [M, N] in x's dtype.
// K % 32 == 0, G % 32 == 0, N % 4 == 0.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const at::Tensor& mins, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "x [M, K], qweight [N, K / 2]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  const bool is_4bit = qweight.scalar_type() == at::kByte;
  TORCH_CHECK(is_4bit || qweight.scalar_type() == at::kChar, "qweight: uint8 (4-bit pairs) or int8");
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1), G = group_size;
  TORCH_CHECK(qweight.size(1) * (is_4bit ? 2 : 1) == K, "qweight holds K / 2 (4-bit) or K (8-bit) bytes per row");
  TORCH_CHECK(K % kBlock == 0 && G % kBlock == 0 && G > 0 && N % 4 == 0,
              "int4_linear: K and the group size must be multiples of 32, N of 4");
  const int64_t num_groups = (K + G - 1) / G;
  TORCH_CHECK(scale.sizes() == mins.sizes() && scale.size(0) == N && scale.size(1) == num_groups,
              "scale and min: [N, ceil(K / group_size)]");
  TORCH_CHECK(scale.scalar_type() == mins.scalar_type() &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
              "scale and min: both float32 or both float16");
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto xf = x.to(at::kFloat).contiguous();
  // per activation row and group: sum of x, for the min term (one row; batches dequantize panels instead)
  at::Tensor xsum;
  if (M < kPanelMinRows) {
    auto padded = num_groups * G == K ? xf : at::constant_pad_nd(xf, {0, num_groups * G - K});
    xsum = padded.view({M, num_groups, G}).sum(-1).contiguous();
  }
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias: one per output row");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  const float* xsp = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
  auto by_scale = [&](const auto* q, auto* o) {
    if (M >= kPanelMinRows) {
      if (s.scalar_type() == at::kFloat)
        grouped_panels(xp, q, s.data_ptr<float>(), mn.data_ptr<float>(), b, o, M, N, K, G);
      else
        grouped_panels(xp, q, s.data_ptr<c10::Half>(), mn.data_ptr<c10::Half>(), b, o, M, N, K, G);
    } else if (s.scalar_type() == at::kFloat) {
      grouped_rows(xp, xsp, q, s.data_ptr<float>(), mn.data_ptr<float>(), b, o, M, N, K, G);
    } else {
      grouped_rows(xp, xsp, q, s.data_ptr<c10::Half>(), mn.data_ptr<c10::Half>(), b, o, M, N, K, G);
    }
  };
  auto dispatch = [&](auto* o) {
    if (is_4bit) by_scale(qw.data_ptr<uint8_t>(), o);
    else by_scale(qw.data_ptr<int8_t>(), o);
  };
  if (x.scalar_type() == at::kFloat) dispatch(out.data_ptr<float>());
  else dispatch(out.data_ptr<c10::BFloat16>());
  return out;
}

// The float32 weight [N, K] of qweight / scale / min (long prefills hand it to the dense GEMM): the panels'
// dequantization over all rows, threads splitting them. ~40x faster than the same arithmetic in PyTorch ops.
at::Tensor grouped_dequantize(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& mins,
                              int64_t group_size) {
  TORCH_CHECK(qweight.dim() == 2, "qweight [N, K / 2] uint8 or [N, K] int8");
  const bool is_4bit = qweight.scalar_type() == at::kByte;
  TORCH_CHECK(is_4bit || qweight.scalar_type() == at::kChar, "qweight: uint8 (4-bit pairs) or int8");
  const int64_t N = qweight.size(0), K = qweight.size(1) * (is_4bit ? 2 : 1), G = group_size;
  TORCH_CHECK(K % kBlock == 0 && G % kBlock == 0 && G > 0, "K and the group size must be multiples of 32");
  const int64_t num_groups = (K + G - 1) / G;
  TORCH_CHECK(scale.sizes() == mins.sizes() && scale.size(0) == N && scale.size(1) == num_groups &&
                  scale.scalar_type() == mins.scalar_type() &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
              "scale and min: [N, ceil(K / group_size)], both float32 or both float16");
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto out = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  auto rows = [&](const auto* q, const auto* sc, const auto* mi) {
    const int64_t bytes = is_4bit ? K / 2 : K;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        dequantize_row(q + n * bytes, sc + n * num_groups, mi + n * num_groups, K, G, o + n * K);
    });
  };
  auto by_scale = [&](const auto* q) {
    if (s.scalar_type() == at::kFloat) rows(q, s.data_ptr<float>(), mn.data_ptr<float>());
    else rows(q, s.data_ptr<c10::Half>(), mn.data_ptr<c10::Half>());
  };
  if (is_4bit) by_scale(qw.data_ptr<uint8_t>());
  else by_scale(qw.data_ptr<int8_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor mins, int group_size, Tensor? bias) -> Tensor");
  m.def("grouped_dequantize(Tensor qweight, Tensor scale, Tensor mins, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("grouped_dequantize", &grouped_dequantize);
}
