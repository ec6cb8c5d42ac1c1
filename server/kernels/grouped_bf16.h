// Grouped 4/8-bit weights (grouped_dot.h's layout) dequantized to bfloat16 for AMX tiles (grouped_amx_cpu.cpp):
// w = q * scale + min in float32, rounded once to bf16, the weight a bf16 checkpoint of those values holds. The
// block size and the float16 scale widening serve the AVX512-BF16 kernel too (grouped_dpbf16_cpu.cpp), which
// expands the integers q instead and scales each group's sum.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define GENSERVE_BF16_DOT 1
#include <immintrin.h>
#else
#define GENSERVE_BF16_DOT 0
#endif

namespace genserve_bf16 {

#if GENSERVE_BF16_DOT

constexpr int64_t kBlock = 32;  // values per packed block

// 4-bit weights by table: a group's 16 possible weights bf16(q * scale + min), computed once, and one word
// permute per block picks them; twice as fast as widening each nibble to float (3 vs 6 cycles per block, Xeon).
// Entries [0, 16) hold group 0's values, [16, 32) group 1's: groups of 32 share one table per two blocks.
inline __m512i value_table(float s0, float m0, float s1, float m1) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(q, _mm512_set1_ps(s1), _mm512_set1_ps(m1)),
                                                       _mm512_fmadd_ps(q, _mm512_set1_ps(s0), _mm512_set1_ps(m0))));
}

// one packed block (16 bytes: value j low nibble, j + 16 high) -> 32 bf16 from the table's half at `half`
inline __m512i lookup_block(const uint8_t* p, __m512i table, __m512i half) {
  const __m512i shifts = _mm512_setr_epi64(0, 0, 0, 0, 0x0004000400040004LL, 0x0004000400040004LL,
                                           0x0004000400040004LL, 0x0004000400040004LL);
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(bytes), shifts),
                                           _mm512_set1_epi16(0x0F));
  return _mm512_permutexvar_epi16(_mm512_or_si512(nibbles, half), table);
}

// one weight row [K] as bfloat16, block b at w + b * block_stride (a row of its tile for AMX, the next 32 values
// for a plain row); scale and min of its groups as float32
inline void dequantize_row_bf16(const uint8_t* q, const float* scale, const float* mins, int64_t K, int64_t G,
                                int64_t groups, uint16_t* w, int64_t block_stride) {
  const int64_t per_table = G == kBlock ? 2 : 1;
  const __m512i second = _mm512_set1_epi16(16);
  for (int64_t g = 0; g < groups; g += per_table) {
    const int64_t g1 = std::min(g + per_table - 1, groups - 1);
    const __m512i table = value_table(scale[g], mins[g], scale[g1], mins[g1]);
    for (int64_t k = g * G; k < std::min(K, (g + per_table) * G); k += kBlock)
      _mm512_storeu_si512(w + k / kBlock * block_stride,
                          lookup_block(q + k / 2, table, k >= (g + 1) * G ? second : _mm512_setzero_si512()));
  }
}
inline void dequantize_row_bf16(const int8_t* q, const float* scale, const float* mins, int64_t K, int64_t G,
                                int64_t groups, uint16_t* w, int64_t block_stride) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = _mm512_set1_ps(scale[g]), m = _mm512_set1_ps(mins[g]);
    for (int64_t k = g * G; k < std::min(K, (g + 1) * G); k += kBlock) {
      const __m128i* p = reinterpret_cast<const __m128i*>(q + k);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s, m), _mm512_fmadd_ps(lo, s, m));
      _mm512_storeu_si512(w + k / kBlock * block_stride, reinterpret_cast<__m512i>(pair));
    }
  }
}

// a panel's scales or mins as float32 (float16 ones converted 16 at a time)
inline const float* as_float(const float* v, int64_t, float*) { return v; }
inline const float* as_float(const c10::Half* v, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(v[i].x);
  return out;
}

#endif  // GENSERVE_BF16_DOT

}  // namespace genserve_bf16
