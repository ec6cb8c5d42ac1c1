// The int8-activation dot products of int8_dot_cpu.cpp (activations rounded to int8 in blocks of 32, integer dot
// products against grouped 4/8-bit weights), as task ranges: int4_linear_int8_activations splits them with
// at::parallel_for, llama_decode_cpu.cpp among its own threads. The arithmetic is described in int8_dot_cpu.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace genserve_int8 {

constexpr int kBlock = 32;

using genserve_simd::widen;

// One activation row as int8 blocks. For 4-bit weights each pair of blocks is stored as its 16 low-nibble
// partners then its 16 high-nibble partners, side by side for both blocks ([b 0..15 | b+1 0..15][b 16..31 |
// b+1 16..31]), the order in which one 32-byte load of two packed weight blocks unpacks; a trailing odd block
// and 8-bit weights keep the natural order.
struct QuantizedRow {
  std::vector<int8_t> q;
  std::vector<float> scale;  // one per block
  std::vector<float> group_sum;  // exact float sum of x per weight group, for the min term
  std::vector<int32_t> code_sum;  // sum of q per block: int8_panel.h's offset correction for 8-bit weights
};

inline GENSERVE_SHARED void quantize_row(const float* x, int64_t K, int64_t G, bool pair_order, QuantizedRow& out) {
  const int64_t blocks = K / kBlock, groups = (K + G - 1) / G;
  out.q.assign(K, 0);
  out.scale.assign(blocks, 0.f);
  out.group_sum.assign(groups, 0.f);
  out.code_sum.assign(blocks, 0);
  int8_t natural[kBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * kBlock;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // the scalar loop's arithmetic in two vectors (cvtps rounds to nearest even, as lrintf does)
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(natural), _mm512_cvtepi32_epi8(q_lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(natural + 16), _mm512_cvtepi32_epi8(q_hi));
    out.code_sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
#else
    float amax = 0.f, sum = 0.f;
    for (int i = 0; i < kBlock; ++i) {
      amax = std::max(amax, std::fabs(xb[i]));
      sum += xb[i];
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t codes = 0;
    for (int i = 0; i < kBlock; ++i) codes += natural[i] = static_cast<int8_t>(std::lrintf(xb[i] * inv));
    out.code_sum[b] = codes;
#endif
    out.group_sum[b * kBlock / G] += sum;
    out.scale[b] = amax / 127.f;
    int8_t* dst = out.q.data() + b * kBlock;
    if (!pair_order || (b == blocks - 1 && blocks % 2)) {
      std::memcpy(dst, natural, kBlock);
    } else {  // pair (b0, b0 + 1) occupies 64 bytes from b0 * 32: lows of both, then highs of both
      int8_t* pair = out.q.data() + (b & ~int64_t(1)) * kBlock;
      const int half = (b & 1) * 16;
      std::memcpy(pair + half, natural, 16);
      std::memcpy(pair + 32 + half, natural + 16, 16);
    }
  }
}

#if defined(__AVX2__)
// 32 unsigned bytes times 32 signed bytes, summed in 8 int32 lanes (lanes 0-3 and 4-7: the two 128-bit halves)
inline __m256i dot_u8_i8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// [a, a, a, a, b, b, b, b] from two adjacent floats
inline __m256 pair_scale(const float* p) {
  const __m256 two = _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))));
  return _mm256_permutevar8x32_ps(two, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
#endif

// sum over blocks of dx[b] * ws[b] * dot(xq_b, q_b) for `rows` weight rows and one activation row. ws: the
// weight's scale of each block, as float (per row, precomputed by the caller).
template <int rows, typename weight_t>
inline void dot_rows(const int8_t* xq, const float* dx, const weight_t* const* qw, const float* const* ws, int64_t K,
                     float* out) {
  const int64_t blocks = K / kBlock;
#if defined(__AVX2__)
  __m256 acc[rows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
  if constexpr (std::is_same<weight_t, uint8_t>::value) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
      const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock + 32));
      for (int r = 0; r < rows; ++r) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw[r] + b * 16));
        const __m256i lo = _mm256_and_si256(bytes, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
        const __m256i sums = _mm256_add_epi32(dot_u8_i8(lo, x_lo), dot_u8_i8(hi, x_hi));
        const __m256 scale = _mm256_mul_ps(pair_scale(dx + b), pair_scale(ws[r] + b));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
      }
    }
    if (b < blocks) {  // one block left: natural order, values 0..15 then 16..31
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
      for (int r = 0; r < rows; ++r) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qw[r] + b * 16));
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
        const __m256i sums = dot_u8_i8(_mm256_and_si256(both, mask), xv);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dx[b] * ws[r][b]), acc[r]);
      }
    }
  } else {
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
      for (int r = 0; r < rows; ++r) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw[r] + b * kBlock));
        const __m256i sums = dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dx[b] * ws[r][b]), acc[r]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) out[r] = hsum8(acc[r]);
#else
  for (int r = 0; r < rows; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t dot = 0;
      const int8_t* xb = xq + b * kBlock;
      for (int i = 0; i < kBlock; ++i) {
        int32_t q;
        int64_t pos = i;  // position of value i of block b within xq's storage
        if constexpr (std::is_same<weight_t, uint8_t>::value) {
          const uint8_t byte = qw[r][b * 16 + (i & 15)];
          q = i < 16 ? (byte & 0x0F) : (byte >> 4);
          if (!(b == blocks - 1 && blocks % 2)) {
            const int64_t pair = b & ~int64_t(1);
            pos = (pair - b) * kBlock + (i < 16 ? 0 : 32) + (b & 1) * 16 + (i & 15);
          }
        } else {
          q = qw[r][b * kBlock + i];
        }
        dot += q * xb[pos];
      }
      total += dx[b] * ws[r][b] * static_cast<float>(dot);
    }
    out[r] = total;
  }
#endif
}

// each block's weight scale as float; `per_group` = G / 32 blocks share one (no division in the loop: an
// integer divide per block cost more than the block's dot product)
template <typename scale_t>
inline void block_scales(const scale_t* scale, int64_t blocks, int64_t per_group, float* ws) {
  int64_t b = 0;
#if defined(__F16C__) && defined(__AVX2__)
  if constexpr (std::is_same<scale_t, c10::Half>::value) {
    if (per_group == 1)
      for (; b + 8 <= blocks; b += 8)
        _mm256_storeu_ps(ws + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + b))));
  }
#endif
  for (int64_t g = b / per_group; b < blocks; ++g) {
    const float value = widen(scale[g]);
    for (int64_t i = 0; i < per_group && b < blocks; ++i) ws[b++] = value;
  }
}

// sum_g mins[g] * group_sum[g]: the min term of one output
template <typename scale_t>
inline float min_term(const scale_t* mins, const float* group_sum, int64_t groups) {
  float total = 0.f;
  int64_t g = 0;
#if defined(__F16C__) && defined(__AVX2__)
  if constexpr (std::is_same<scale_t, c10::Half>::value) {
    __m256 acc = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g))),
                            _mm256_loadu_ps(group_sum + g), acc);
    total = hsum8(acc);
  }
#endif
  for (; g < groups; ++g) total += widen(mins[g]) * group_sum[g];
  return total;
}

constexpr int kRows = 4;  // weight rows per task

// Tasks [begin, end) of N / kRows; ws_buffer: kRows * K / 32 floats of the caller's thread.
template <typename weight_t, typename scale_t, typename out_t>
GENSERVE_SHARED void q8_tasks(const QuantizedRow* xs, const weight_t* qw, const scale_t* scale, const scale_t* mins, const float* bias,
              out_t* out, int64_t M, int64_t N, int64_t K, int64_t G, int64_t begin, int64_t end, float* ws_buffer) {
  constexpr int64_t bytes_per_row_div = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  const int64_t row_bytes = K / bytes_per_row_div, groups = (K + G - 1) / G, blocks = K / kBlock;
  const int64_t ahead = genserve_simd::prefetch_distance();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n0 = t * kRows;
    const weight_t* rows[kRows];
    const float* ws[kRows];
    for (int r = 0; r < kRows; ++r) {
      rows[r] = qw + (n0 + r) * row_bytes;
      block_scales(scale + (n0 + r) * groups, blocks, G / kBlock, ws_buffer + r * blocks);
      ws[r] = ws_buffer + r * blocks;
    }
    if (t + ahead < end) genserve_simd::prefetch_bytes(qw + (n0 + ahead * kRows) * row_bytes, kRows * row_bytes);
    for (int64_t m = 0; m < M; ++m) {
      const QuantizedRow& x = xs[m];
      float acc[kRows];
      dot_rows<kRows>(x.q.data(), x.scale.data(), rows, ws, K, acc);
      for (int r = 0; r < kRows; ++r) {
        const int64_t n = n0 + r;
        const float total = acc[r] + (bias ? bias[n] : 0.f) + min_term(mins + n * groups, x.group_sum.data(), groups);
        out[m * N + n] = static_cast<out_t>(total);
      }
    }
  }
}

}  // namespace genserve_int8
