// The inner loops of grouped 4-bit / 8-bit weight matmuls (int4_linear_cpu.cpp's layout and arithmetic), as task
// ranges: int4_linear splits them with at::parallel_for, llama_decode_cpu.cpp among its own threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace genserve_grouped {

using namespace genserve_simd;

constexpr int kBlock = 32;  // values per packed block (16 bytes)

// the 32 values of one block as four float vectors of 8 (AVX2) or two of 16 (AVX-512)
inline void widen_block(const int8_t* p, vfloat* out) {  // 8-bit weights (GGUF Q8_0): 32 bytes
  for (int v = 0; v < kBlock / W; ++v) out[v] = loadv(p + v * W);
}
inline void widen_block(const uint8_t* p, vfloat* out) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  // the 16 bytes in both 128-bit lanes; one in-lane byte shuffle per 8 bytes puts each byte in an int32 lane, and a
  // mask or a shift takes its low or high nibble: two shuffles per block where widening through pmovzx takes six,
  // and the shuffle ports set the pace of a one-row matmul (1.4x on [3072, 576], Zen 3)
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i first = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                         4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
  const __m256i second = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
                                          12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  const __m256i b0 = _mm256_shuffle_epi8(bytes, first), b1 = _mm256_shuffle_epi8(bytes, second);
  out[0] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_and_si256(b0, nibble)));   // values 0..7
  out[1] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_and_si256(b1, nibble)));   // 8..15
  out[2] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)));       // 16..23
  out[3] = reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)));       // 24..31
#elif defined(__AVX512F__)
  // the 16 bytes as int32 lanes, then their low and high nibbles. The portable loop below wrote the values to the
  // stack and read them back as vectors: on a Xeon (Sapphire Rapids) those loads missed store forwarding, and a
  // one-row [3072, 576] matmul took 530 us
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  out[0] = reinterpret_cast<vfloat>(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F))));
  out[1] = reinterpret_cast<vfloat>(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)));
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

// One activation row (batches of kPanelMinRows or more run the panels below): tasks of kRowsPerTask weight rows
// sharing each x load. 4 rows left the widened blocks and the accumulators short of registers (a float decode
// step x0.89-0.98 with 2, paired per step on Zen 3; 8 rows x1.3). Tasks [begin, end) of N / kRowsPerTask.
constexpr int64_t kRowsPerTask = 2;

template <typename weight_t, typename scale_t, typename out_t>
GENSERVE_SHARED void grouped_row_tasks(const float* x, const float* xsum, const weight_t* qw, const scale_t* scale,
                                       const scale_t* mins, const float* bias, out_t* out, int64_t N, int64_t K,
                                       int64_t G, int64_t begin, int64_t end) {
  const int64_t num_groups = (K + G - 1) / G;
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  const int64_t ahead = prefetch_distance();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n0 = t * kRowsPerTask;
    prefetch_bytes(qw + (n0 + ahead * kRowsPerTask) * (K / kPacking),
                   t + ahead < end ? kRowsPerTask * K / kPacking : 0);
    run_tile<kRowsPerTask, 1>(x, xsum, qw, scale, mins, bias, out, N, K, G, num_groups, n0, 0);
  }
}

// per activation row and group: the float sum of x, for the min term of grouped_row_tasks
inline GENSERVE_SHARED void group_sums(const float* x, int64_t M, int64_t K, int64_t G, float* out) {
  const int64_t num_groups = (K + G - 1) / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < num_groups; ++g) {
      const float* xg = x + m * K + g * G;
      const int64_t n = std::min(G, K - g * G);
      vfloat acc = vfloat{};
      for (int64_t k = 0; k < n; k += W) acc += loadv(xg + k);  // K and G are multiples of 32
      out[m * num_groups + g] = hsum(acc);
    }
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

// Tasks [begin, end) of panels_of(N); panel: a kPanel * K float buffer of the caller's thread.
inline int64_t panels_of(int64_t N) { return (N + kPanel - 1) / kPanel; }

template <typename weight_t, typename scale_t, typename out_t>
GENSERVE_SHARED void grouped_panel_tasks(const float* x, const weight_t* qw, const scale_t* scale, const scale_t* mins,
                         const float* bias, out_t* out, int64_t M, int64_t N, int64_t K, int64_t G, int64_t begin,
                         int64_t end, float* panel) {
  const int64_t num_groups = (K + G - 1) / G;
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t p0 = t * kPanel, p_rows = std::min(kPanel, N - p0);
    for (int64_t r = 0; r < p_rows; ++r)
      dequantize_row(qw + (p0 + r) * (K / kPacking), scale + (p0 + r) * num_groups, mins + (p0 + r) * num_groups,
                     K, G, panel + r * K);
    for (int64_t r = 0; r < p_rows; r += 4) {  // N % 4 == 0
      const float* w = panel + r * K;
      int64_t m0 = 0;
      for (; m0 + 3 <= M; m0 += 3) dot_tile<4, 3>(x, w, bias, out, N, K, p0 + r, m0);
      if (M - m0 == 2) dot_tile<4, 2>(x, w, bias, out, N, K, p0 + r, m0);
      else if (M - m0 == 1) dot_tile<4, 1>(x, w, bias, out, N, K, p0 + r, m0);
    }
  }
}

}  // namespace genserve_grouped
