// y = x @ W^T (+ bias) for grouped 4-bit / 8-bit weights (grouped_dot.h's layout) and bfloat16 activations, with
// AVX512-BF16 dot products (vdpbf16ps: 32 bf16 products summed into 16 float32 lanes per instruction) for CPUs that
// have them without AMX tiles (AMD Zen 4 and later). int4_linear's float panels do 16 FMAs per instruction; on Zen 4
// at 32 rows torch's bf16 linear (oneDNN, on vdpbf16ps) beat them. Each thread dequantizes panels of kPanelRows
// weight rows to bf16 once per call (grouped_bf16.h: w = q * scale + min in float32, one rounding to bf16), and a
// register tile of 4 weight rows x 4 activation rows sums their products in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "grouped_bf16.h"
#include "grouped_operands.h"

namespace {

using namespace genserve_grouped;
#if GENSERVE_BF16_DOT
using namespace genserve_bf16;

constexpr int64_t kPanelRows = 16;  // weight rows dequantized per task: 18 KB of bf16 at K = 576, in L1
constexpr int kTileRows = 4;        // weight rows per register tile
constexpr int kTileCols = 6;        // activation rows per register tile: 24 accumulators, 4 weight registers

// Four vectors -> one whose 128-bit lane l holds (a0, a1, a2, a3)'s sums over lane l's four floats.
inline __m512 sum_lanes4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(pd(s01), pd(s23))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(pd(s01), pd(s23))));
}

// Sixteen accumulators -> one vector whose lane i is the sum of acc[i]'s 16 lanes (~45 shuffles and adds, where
// sixteen separate reductions take ~150).
inline __m512 sum16(const __m512* acc) {
  const __m512 u0 = sum_lanes4(acc[0], acc[1], acc[2], acc[3]), u1 = sum_lanes4(acc[4], acc[5], acc[6], acc[7]);
  const __m512 u2 = sum_lanes4(acc[8], acc[9], acc[10], acc[11]);
  const __m512 u3 = sum_lanes4(acc[12], acc[13], acc[14], acc[15]);
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x88), _mm512_shuffle_f32x4(u2, u3, 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
}

// out[m0 + c, n0 + r] = dot(x[m0 + c], w[r]) + bias[n0 + r] for r < 4, c < cols: w the panel's rows at n0 (bf16,
// row-major [4][K]), x bf16 [M, K]
template <int cols>
inline void dot_tile(const uint16_t* x, const uint16_t* w, const float* bias, c10::BFloat16* out, int64_t N,
                     int64_t K, int64_t n0, int64_t m0) {
  __m512 acc[kTileRows * kTileCols];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBlock) {
    __m512bh wv[kTileRows];
    for (int r = 0; r < kTileRows; ++r) wv[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + r * K + k));
    for (int c = 0; c < cols; ++c) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + (m0 + c) * K + k));
      for (int r = 0; r < kTileRows; ++r) acc[c * kTileRows + r] = _mm512_dpbf16_ps(acc[c * kTileRows + r], wv[r], xv);
    }
  }
  alignas(64) float sums[32];
  _mm512_store_ps(sums, sum16(acc));  // lane c * 4 + r: weight row n0 + r, activation row m0 + c
  if (cols > 4) {
    __m512 rest[16];
    for (int i = 0; i < 16; ++i) rest[i] = i < (cols - 4) * kTileRows ? acc[16 + i] : _mm512_setzero_ps();
    _mm512_store_ps(sums + 16, sum16(rest));
  }
  for (int c = 0; c < cols; ++c) {
    const __m128 b = bias ? _mm_loadu_ps(bias + n0) : _mm_setzero_ps();
    const __m128i y = reinterpret_cast<__m128i>(_mm_cvtneps_pbh(_mm_add_ps(_mm_load_ps(sums + c * kTileRows), b)));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + (m0 + c) * N + n0), y);
  }
}

// Panels [begin, end) of kPanelRows weight rows (the last may hold fewer, a multiple of 4), all M rows of x against
// each, in activation tiles of 4 (the x tile stays in L1 across the panel's weight rows).
template <typename weight_t, typename scale_t>
void panel_tasks(const uint16_t* x, const weight_t* qw, const scale_t* scale, const scale_t* mins, const float* bias,
                 c10::BFloat16* out, int64_t M, int64_t N, int64_t K, int64_t G, int64_t begin, int64_t end) {
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  const int64_t num_groups = (K + G - 1) / G;
  std::vector<uint16_t> panel(kPanelRows * K);
  std::vector<float> scale_f(num_groups), mins_f(num_groups);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n_begin = t * kPanelRows, rows = std::min(kPanelRows, N - n_begin);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = n_begin + r;
      const float* sf = as_float(scale + n * num_groups, num_groups, scale_f.data());
      const float* mf = as_float(mins + n * num_groups, num_groups, mins_f.data());
      dequantize_row_bf16(qw + n * (K / kPacking), sf, mf, K, G, num_groups, panel.data() + r * K, kBlock);
    }
    for (int64_t m0 = 0; m0 < M; m0 += kTileCols)
      for (int64_t r = 0; r < rows; r += kTileRows) {
        const uint16_t* w = panel.data() + r * K;
        switch (std::min<int64_t>(kTileCols, M - m0)) {
          case 6: dot_tile<6>(x, w, bias, out, N, K, n_begin + r, m0); break;
          case 5: dot_tile<5>(x, w, bias, out, N, K, n_begin + r, m0); break;
          case 4: dot_tile<4>(x, w, bias, out, N, K, n_begin + r, m0); break;
          case 3: dot_tile<3>(x, w, bias, out, N, K, n_begin + r, m0); break;
          case 2: dot_tile<2>(x, w, bias, out, N, K, n_begin + r, m0); break;
          default: dot_tile<1>(x, w, bias, out, N, K, n_begin + r, m0);
        }
      }
  }
}
#endif  // GENSERVE_BF16_DOT

// Whether this build can run int4_linear_dpbf16: compiled for a CPU with AVX512-BF16 (the build is -march=native).
bool has_avx512_bf16() { return GENSERVE_BF16_DOT; }

// x: [M, K] bfloat16; qweight / scale / min as int4_linear (grouped_operands.h); bias [N] -> [M, N] bfloat16.
// bf16 products summed in float32, like int4_linear_amx (in another order).
at::Tensor int4_linear_dpbf16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                              const at::Tensor& mins, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(has_avx512_bf16(), "int4_linear_dpbf16: this CPU or build has no AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_linear_dpbf16: x [M, K] bfloat16");
  const auto op = check_grouped_operands(qweight, scale, mins, x.size(1), group_size,
                                                           "int4_linear_dpbf16");
  const int64_t M = x.size(0), N = op.N, K = op.K, G = op.G;
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
#if GENSERVE_BF16_DOT
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto xc = x.contiguous();
  const at::Tensor bias_f = float_bias(bias, N);
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
  auto* o = out.data_ptr<c10::BFloat16>();
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  with_typed_operands(op, qw, s, mn, [&](const auto* q, const auto* sc, const auto* mi) {
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      panel_tasks(xp, q, sc, mi, b, o, M, N, K, G, begin, end);
    });
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve_cpu, m) {
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);  // no tensor to dispatch on: one catch-all kernel
  m.def("int4_linear_dpbf16(Tensor x, Tensor qweight, Tensor scale, Tensor mins, int group_size, Tensor? bias) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) {
  m.impl("int4_linear_dpbf16", &int4_linear_dpbf16);
}
