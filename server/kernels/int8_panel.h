// The int8-activation matmul of int8_dot.h for batches: VNNI dot products (vpdpbusd: in each of 16 int32 lanes,
// the sum of 4 unsigned-by-signed byte products) on panels of 32 weight rows, the layout of grouped_dpbf16_cpu.cpp
// with bytes for bf16 pairs. Each panel is expanded once per call to [K / 4][16 rows][4 bytes] per 16 rows (one
// vector = one k quad of 16 rows) and every activation row's quad is broadcast, so a lane sums one output and
// nothing is reduced across lanes; the row kernel (dot_rows) unpacks the weights again for every activation row.
//
// Same arithmetic as dot_rows (one int32 dot product per block of 32, scaled by dx * the weight's scale, plus the
// group's min times the exact float sum of x), so the two agree up to the order of the float sums. 4-bit q (0..15)
// are the unsigned operand as they are; 8-bit q (signed) enter as q + 128, and each block's dot product starts at
// -128 * sum(xq) to take the offset back out (exact in int32).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "int8_dot.h"
#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GENSERVE_INT8_PANEL 1
#else
#define GENSERVE_INT8_PANEL 0
#endif

namespace genserve_int8 {

#if GENSERVE_INT8_PANEL

constexpr int64_t kPanelLanes = 16;  // weight rows per vector
constexpr int64_t kPanelRows = 32;   // two vectors: 18 KB of bytes at K = 576
constexpr int kPanelTileRows = 6;    // activation rows per register tile: 12 int32 sums and 12 float accumulators
// batches of this many rows or more run the panels (below it the row kernel, whose weights are read once per row
// anyway); a guess refined by timing in int8_dot_cpu.cpp's comment
constexpr int64_t kPanelMinRows = 4;

inline int64_t panels_of(int64_t N) { return (N + kPanelRows - 1) / kPanelRows; }
// a thread's panel buffer: the bytes, then scales and mins per group of its 32 rows, and room to align to 64
inline int64_t panel_buffer_bytes(int64_t K, int64_t groups) { return kPanelRows * K + 2 * kPanelRows * groups * 4 + 64; }

// Block b of 16 weight rows (row r at rows + r * stride, rows from `valid` on zero) as quad[d], lane l = row l's k
// (32 b + 4d .. + 3) as 4 unsigned bytes. 4-bit: dword i of a row's 16-byte block holds quads i (low nibbles) and
// 4 + i (high).
inline void expand_quads(const uint8_t* rows, int64_t stride, int valid, int64_t b, __m512i* quad) {
  __m512i dword[4];
  genserve_simd::transpose_dwords_16x4(rows + b * kBlock / 2, stride, valid, dword);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int i = 0; i < 4; ++i) {
    quad[i] = _mm512_and_si512(dword[i], nibble);
    quad[4 + i] = _mm512_and_si512(_mm512_srli_epi16(dword[i], 4), nibble);
  }
}
// 8-bit: a row's block is 8 dwords, so a 16 x 8 dword transpose (rows r and r + 8 share a vector, one per 256-bit
// half, and the two halves transpose 8 x 8 side by side), then q + 128 (the sign bit flipped)
inline void expand_quads(const int8_t* rows, int64_t stride, int valid, int64_t b, __m512i* quad) {
  auto row = [&](int r) {
    return r < valid ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * stride + b * kBlock))
                     : _mm256_setzero_si256();
  };
  __m512i z[8], t[8];
  for (int r = 0; r < 8; ++r) z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(row(r)), row(r + 8), 1);
  for (int r = 0; r < 8; r += 2) {  // per 128-bit lane: a0 b0 a1 b1, a2 b2 a3 b3
    t[r] = _mm512_unpacklo_epi32(z[r], z[r + 1]);
    t[r + 1] = _mm512_unpackhi_epi32(z[r], z[r + 1]);
  }
  for (int r = 0; r < 8; r += 4) {  // z[r + d], 128-bit lane: dword d (or 4 + d) of rows r .. r + 3
    z[r] = _mm512_unpacklo_epi64(t[r], t[r + 2]);
    z[r + 1] = _mm512_unpackhi_epi64(t[r], t[r + 2]);
    z[r + 2] = _mm512_unpacklo_epi64(t[r + 1], t[r + 3]);
    z[r + 3] = _mm512_unpackhi_epi64(t[r + 1], t[r + 3]);
  }
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int d = 0; d < 4; ++d) {  // rows 0-3 with rows 4-7 of each half
    quad[d] = _mm512_xor_si512(_mm512_permutex2var_epi64(z[d], first, z[4 + d]), flip);
    quad[4 + d] = _mm512_xor_si512(_mm512_permutex2var_epi64(z[d], second, z[4 + d]), flip);
  }
}

// What every tile of one call reads.
template <typename out_t>
struct PanelCall {
  const QuantizedRow* xs;
  const float* bias;
  out_t* out;
  int64_t M, N, K, G, groups;
};

// one expanded panel: quads [2][K / 4][16][4]; scales and mins [groups][32]; weight rows n0 .. n0 + valid - 1
struct Int8Panel {
  const uint8_t* quads;
  const float* scale;
  const float* mins;
  int64_t n0, valid;
};

inline void store_row(float* out, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(out, mask, v); }
inline void store_row(c10::BFloat16* out, __mmask16 mask, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_mask_storeu_epi16(out, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else  // round to nearest even, as c10::BFloat16 does (the values are finite sums)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_mask_storeu_epi16(out, mask, _mm512_cvtepi32_epi16(rounded));
#endif
}

// out[m0 + i, n0 + 16 j + l] for i < rows, j < vectors, l < 16 (rows past the panel's valid ones not stored)
template <int vectors, int rows, bool four_bit, typename out_t>
inline void int8_dot_tile(const PanelCall<out_t>& c, const Int8Panel& p, int64_t m0) {
  __m512 acc[rows][vectors];
  for (auto& a : acc)
    for (auto& v : a) v = _mm512_setzero_ps();
  const QuantizedRow* x[rows];
  for (int i = 0; i < rows; ++i) x[i] = c.xs + m0 + i;
  const int64_t quads_per_half = c.K / 4;
  for (int64_t g = 0; g < c.groups; ++g) {
    __m512 s[vectors];
    for (int j = 0; j < vectors; ++j) s[j] = _mm512_loadu_ps(p.scale + g * kPanelRows + j * kPanelLanes);
    const int64_t end = std::min(c.K, (g + 1) * c.G) / kBlock;
    for (int64_t b = g * c.G / kBlock; b < end; ++b) {
      __m512i dot[rows][vectors];
      for (int i = 0; i < rows; ++i) {
        const __m512i start = four_bit ? _mm512_setzero_si512() : _mm512_set1_epi32(-128 * x[i]->code_sum[b]);
        for (int j = 0; j < vectors; ++j) dot[i][j] = start;
      }
      const uint8_t* w = p.quads + b * 8 * 64;
      for (int d = 0; d < 8; ++d) {
        __m512i wv[vectors];
        for (int j = 0; j < vectors; ++j) wv[j] = _mm512_loadu_si512(w + (j * quads_per_half + d) * 64);
        for (int i = 0; i < rows; ++i) {
          int32_t xd;
          std::memcpy(&xd, x[i]->q.data() + b * kBlock + 4 * d, 4);
          const __m512i xb = _mm512_set1_epi32(xd);
          for (int j = 0; j < vectors; ++j) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], wv[j], xb);
        }
      }
      for (int i = 0; i < rows; ++i) {
        const __m512 dx = _mm512_set1_ps(x[i]->scale[b]);
        for (int j = 0; j < vectors; ++j)
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), _mm512_mul_ps(dx, s[j]), acc[i][j]);
      }
    }
    for (int j = 0; j < vectors; ++j) {
      const __m512 mn = _mm512_loadu_ps(p.mins + g * kPanelRows + j * kPanelLanes);
      for (int i = 0; i < rows; ++i) acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(x[i]->group_sum[g]), mn, acc[i][j]);
    }
  }
  for (int j = 0; j < vectors; ++j) {
    const int64_t n = p.n0 + j * kPanelLanes, count = std::min<int64_t>(kPanelLanes, p.valid - j * kPanelLanes);
    const __mmask16 mask = count >= kPanelLanes ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    const __m512 bias = c.bias ? _mm512_maskz_loadu_ps(mask, c.bias + n) : _mm512_setzero_ps();
    for (int i = 0; i < rows; ++i) store_row(c.out + (m0 + i) * c.N + n, mask, _mm512_add_ps(acc[i][j], bias));
  }
}

// all M rows against one panel, in tiles of at most kPanelTileRows as even as they go (32 rows: 6, 6, 5, 5, 5, 5)
template <int vectors, bool four_bit, typename out_t>
inline void int8_panel_rows(const PanelCall<out_t>& c, const Int8Panel& p) {
  const int64_t tiles = (c.M + kPanelTileRows - 1) / kPanelTileRows, base = c.M / tiles, longer = c.M % tiles;
  static_assert(kPanelTileRows == 6, "the cases below");
  for (int64_t t = 0, m0 = 0; t < tiles; m0 += base + (t < longer), ++t) {
    switch (base + (t < longer)) {
      case 6: int8_dot_tile<vectors, 6, four_bit>(c, p, m0); break;
      case 5: int8_dot_tile<vectors, 5, four_bit>(c, p, m0); break;
      case 4: int8_dot_tile<vectors, 4, four_bit>(c, p, m0); break;
      case 3: int8_dot_tile<vectors, 3, four_bit>(c, p, m0); break;
      case 2: int8_dot_tile<vectors, 2, four_bit>(c, p, m0); break;
      default: int8_dot_tile<vectors, 1, four_bit>(c, p, m0);
    }
  }
}

// Panels [begin, end) of panels_of(N), each expanded once and multiplied by all M rows of xs (quantize_row's
// natural order: pair_order false). buffer: panel_buffer_bytes(K, groups) of the caller's thread.
template <typename weight_t, typename scale_t, typename out_t>
GENSERVE_SHARED void q8_panel_tasks(const QuantizedRow* xs, const weight_t* qw, const scale_t* scale,
                                    const scale_t* mins, const float* bias, out_t* out, int64_t M, int64_t N,
                                    int64_t K, int64_t G, int64_t begin, int64_t end, void* buffer) {
  constexpr bool four_bit = std::is_same<weight_t, uint8_t>::value;
  const int64_t groups = (K + G - 1) / G, row_bytes = four_bit ? K / 2 : K;
  auto* quads = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buffer) + 63) & ~uintptr_t(63));
  auto* panel_scale = reinterpret_cast<float*>(quads + kPanelRows * K);
  float* panel_mins = panel_scale + kPanelRows * groups;
  const PanelCall<out_t> call{xs, bias, out, M, N, K, G, groups};
  __m512i quad[8];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n0 = t * kPanelRows, valid = std::min(kPanelRows, N - n0);
    for (int64_t r = 0; r < kPanelRows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        panel_scale[g * kPanelRows + r] = r < valid ? genserve_simd::widen(scale[(n0 + r) * groups + g]) : 0.f;
        panel_mins[g * kPanelRows + r] = r < valid ? genserve_simd::widen(mins[(n0 + r) * groups + g]) : 0.f;
      }
    const int vectors = valid > kPanelLanes ? 2 : 1;
    // the next panel's rows are one run of memory, prefetched a share per block expanded (16 rows read at a stride
    // are more streams than the hardware prefetcher follows)
    const char* next = reinterpret_cast<const char*>(qw + (n0 + kPanelRows) * row_bytes);
    const int64_t next_lines = t + 1 < end ? (std::min(kPanelRows, N - n0 - kPanelRows) * row_bytes + 63) / 64 : 0;
    const int64_t blocks = K / kBlock, per_block = (next_lines + vectors * blocks - 1) / (vectors * blocks);
    int64_t line = 0;
    for (int j = 0; j < vectors; ++j) {
      const int rows = static_cast<int>(std::min<int64_t>(kPanelLanes, valid - j * kPanelLanes));
      const auto* first = reinterpret_cast<const weight_t*>(qw + (n0 + j * kPanelLanes) * row_bytes);
      uint8_t* half = quads + j * K * kPanelLanes;
      for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t i = 0; i < per_block && line < next_lines; ++i, ++line) _mm_prefetch(next + line * 64, _MM_HINT_T0);
        expand_quads(first, row_bytes, rows, b, quad);
        for (int d = 0; d < 8; ++d) _mm512_store_si512(half + (b * 8 + d) * 64, quad[d]);
      }
    }
    const Int8Panel panel{quads, panel_scale, panel_mins, n0, valid};
    if (vectors == 2) int8_panel_rows<2, four_bit>(call, panel);
    else int8_panel_rows<1, four_bit>(call, panel);
  }
}

#endif  // GENSERVE_INT8_PANEL

// whether a batch of M rows runs the panels (and so quantizes x in its natural order)
inline bool uses_panels(int64_t M) {
#if GENSERVE_INT8_PANEL
  return M >= kPanelMinRows;
#else
  (void)M;
  return false;
#endif
}

}  // namespace genserve_int8
