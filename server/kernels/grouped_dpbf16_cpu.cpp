// y = x @ W^T (+ bias) for grouped 4-bit / 8-bit weights (grouped_dot.h's layout) and bfloat16 activations, with
// AVX512-BF16 dot products for CPUs that have them without AMX tiles (AMD Zen 4 and later). vdpbf16ps adds, in each
// of 16 float32 lanes, the products of one pair of bf16. Each thread expands panels of 32 weight rows to bf16 once
// per call, pair-interleaved ([K / 2][16 rows][2] per 16 rows, oneDNN's "VNNI" layout), so that one vector holds one
// K pair of 16 rows and each activation row's pair is broadcast: a lane sums one output, with no lane sums left to
// reduce (a quarter of the time of the row-major panels this replaced). The panel holds the integers q (exact in
// bf16), not q * scale + min: each group's dot product is scaled after, out = sum over groups of scale * dot(x, q) +
// min * sum(x), so the weights are exact (not rounded to bf16) and expanding them takes no per-row arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "grouped_bf16.h"
#include "grouped_operands.h"
#include "simd.h"

namespace {

using namespace genserve_grouped;
// the 4-bit expansion permutes bytes (AVX512-VBMI: Zen 4, Sapphire Rapids; not Cooper Lake)
#if GENSERVE_BF16_DOT && defined(__AVX512VBMI__)
#define GENSERVE_DPBF16 1
using namespace genserve_bf16;

constexpr int64_t kLanes = 16;   // weight rows per vector: one output per float32 lane
constexpr int kPanelVectors = 2;  // 16-row halves per panel: 32 rows, 36 KB of bf16 at K = 576
constexpr int64_t kPanelRows = kLanes * kPanelVectors;
constexpr int kTileRows = 6;      // activation rows per register tile: 12 sums and 12 group sums at 2 vectors

// 4-bit weights enter the panel as q + 128: exact in bf16, and its bits are 0x4300 | q (one bitwise op per
// vector). The offset goes into the group's min: min - 128 * scale.
constexpr float kNibbleOffset = 128.0f;

// Byte permutes of the 4-bit expansion below, filled once.
struct NibbleIndices {
  alignas(64) uint8_t low_words[64], high_words[64];  // word t = 2r + c <- byte 4r + c (low) or 4r + 2 + c (high)
  NibbleIndices() {
    for (int t = 0; t < 32; ++t) {
      low_words[2 * t] = static_cast<uint8_t>(4 * (t / 2) + t % 2), high_words[2 * t] = low_words[2 * t] + 2;
      low_words[2 * t + 1] = high_words[2 * t + 1] = 0;  // masked off: the words' high bytes are zero
    }
  }
};
const NibbleIndices kNibbleIndices;

// Block b (K from 32 b) of 16 weight rows from n0 (rows from `rows` on are zero), 4-bit, as pair[d] = the k pair
// (32 b + 2d, + 1) of the 16 rows, lane l = row l, each weight bf16 q + 128. A row's block is 16 bytes (byte j: k = j
// low nibble, j + 16 high), so its dword i holds pairs 2i, 2i + 1 (low nibbles) and 2i + 8, 2i + 9 (high): a 16 x 4
// dword transpose, then one byte permute per two pairs.
inline void expand_block(const uint8_t* qw, int64_t n0, int rows, int64_t K, int64_t b, __m512i* pair) {
  __m512i dword[4];
  genserve_simd::transpose_dwords_16x4(qw + n0 * (K / 2) + b * kBlock / 2, K / 2, rows, dword);
  const NibbleIndices& ix = kNibbleIndices;
  const __m512i low = _mm512_load_si512(ix.low_words), high = _mm512_load_si512(ix.high_words);
  const __m512i nibble = _mm512_set1_epi16(0x0F), bias = _mm512_set1_epi16(0x4300);
  constexpr __mmask64 kEvenBytes = 0x5555555555555555ULL;
  for (int i = 0; i < 4; ++i) {  // dword i: pairs 2i, 2i + 1, 2i + 8, 2i + 9
    const __m512i e0 = _mm512_maskz_permutexvar_epi8(kEvenBytes, low, dword[i]);
    const __m512i e1 = _mm512_maskz_permutexvar_epi8(kEvenBytes, high, dword[i]);
    pair[2 * i] = _mm512_ternarylogic_epi32(e0, nibble, bias, 0xEA);  // (e & 0x0F) | 0x4300
    pair[2 * i + 1] = _mm512_ternarylogic_epi32(e1, nibble, bias, 0xEA);
    pair[2 * i + 8] = _mm512_or_si512(_mm512_srli_epi16(e0, 4), bias);
    pair[2 * i + 9] = _mm512_or_si512(_mm512_srli_epi16(e1, 4), bias);
  }
}

// v[r] = 32 bf16 of row r (one block of K) -> v[d] = the block's pair d of rows 0..15: a 16 x 16 transpose of
// 32-bit pairs in four rounds of 16 shuffles.
inline void transpose_pairs(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);      // per 128-bit lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {  // v[i + j], lane l: pair 4l + j of rows i .. i + 3
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // the 128-bit lanes of v[j], v[4 + j], v[8 + j], v[12 + j] transposed
    const __m512i s0 = _mm512_shuffle_i32x4(v[j], v[4 + j], 0x88), s1 = _mm512_shuffle_i32x4(v[j], v[4 + j], 0xdd);
    const __m512i s2 = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0x88);
    const __m512i s3 = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0xdd);
    t[j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    t[8 + j] = _mm512_shuffle_i32x4(s0, s2, 0xdd);
    t[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xdd);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// The same for 8-bit weights, each bf16 q (exact: |q| <= 128), through float32 and a transpose of pairs.
inline void expand_block(const int8_t* qw, int64_t n0, int rows, int64_t K, int64_t b, __m512i* pair) {
  for (int r = 0; r < 16; ++r) {
    if (r >= rows) {
      pair[r] = _mm512_setzero_si512();
      continue;
    }
    const __m128i* p = reinterpret_cast<const __m128i*>(qw + (n0 + r) * K + b * kBlock);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
    pair[r] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  }
  transpose_pairs(pair);
}
inline float weight_offset(const uint8_t*) { return kNibbleOffset; }
inline float weight_offset(const int8_t*) { return 0.0f; }

// What every tile of one call reads: x bf16 [M, K] and its per-group sums [M, groups], out bf16 [M, N].
struct Call {
  const uint16_t* x;
  const float* x_sums;
  const float* bias;
  c10::BFloat16* out;
  int64_t M, N, K, G, groups;
};

// One panel: its words ([kPanelVectors][K / 2][16][2]), and per group the 32 rows' scales and mins (the offset of
// the words taken off), [groups][32]; rows n0 .. n0 + valid - 1 of the weight.
struct Panel {
  const uint16_t* words;
  const float* scale;
  const float* mins;
  int64_t n0, valid;
};

// out[m0 + i, n0 + 16 j + l] for i < rows, j < vectors, l < 16 (outputs past the panel's valid rows not stored):
// per group, the dot products of x's pairs with the panel's, then scaled by the group's scale, plus its min times
// the sum of x over the group
template <int vectors, int rows>
inline void dot_tile(const Call& c, const Panel& p, int64_t m0) {
  __m512 acc[rows][vectors];
  for (auto& a : acc)
    for (auto& v : a) v = _mm512_setzero_ps();
  const uint32_t* xr[rows];
  for (int i = 0; i < rows; ++i) xr[i] = reinterpret_cast<const uint32_t*>(c.x + (m0 + i) * c.K);
  for (int64_t g = 0; g < c.groups; ++g) {
    __m512 dot[rows][vectors];
    for (auto& a : dot)
      for (auto& v : a) v = _mm512_setzero_ps();
    const int64_t end = std::min(c.K, (g + 1) * c.G) / 2;
    for (int64_t q = g * c.G / 2; q < end; ++q) {
      __m512bh w[vectors];
      for (int j = 0; j < vectors; ++j)
        w[j] = reinterpret_cast<__m512bh>(_mm512_load_si512(p.words + (j * c.K / 2 + q) * 2 * kLanes));
      for (int i = 0; i < rows; ++i) {
        const __m512bh xq = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xr[i][q])));
        for (int j = 0; j < vectors; ++j) dot[i][j] = _mm512_dpbf16_ps(dot[i][j], w[j], xq);
      }
    }
    for (int j = 0; j < vectors; ++j) {
      const __m512 s = _mm512_load_ps(p.scale + g * kPanelRows + j * kLanes);
      const __m512 mn = _mm512_load_ps(p.mins + g * kPanelRows + j * kLanes);
      for (int i = 0; i < rows; ++i)
        acc[i][j] = _mm512_fmadd_ps(dot[i][j], s, _mm512_fmadd_ps(_mm512_set1_ps(c.x_sums[(m0 + i) * c.groups + g]),
                                                                  mn, acc[i][j]));
    }
  }
  for (int j = 0; j < vectors; ++j) {
    const int64_t n = p.n0 + j * kLanes, count = std::min<int64_t>(kLanes, p.valid - j * kLanes);
    const __mmask16 mask = count >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    const __m512 b = c.bias ? _mm512_maskz_loadu_ps(mask, c.bias + n) : _mm512_setzero_ps();
    for (int i = 0; i < rows; ++i)
      _mm256_mask_storeu_epi16(c.out + (m0 + i) * c.N + n, mask,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][j], b))));
  }
}

// all M rows of x against one panel, in tiles of at most kTileRows as even as they go (32 rows: 6, 6, 5, 5, 5, 5,
// not five of 6 and one of 2, which spends a tile's loads on two rows)
template <int vectors>
inline void panel_rows(const Call& c, const Panel& p) {
  const int64_t tiles = (c.M + kTileRows - 1) / kTileRows, base = c.M / tiles, longer = c.M % tiles;
  static_assert(kTileRows == 6, "the cases below");
  for (int64_t t = 0, m0 = 0; t < tiles; m0 += base + (t < longer), ++t) {
    switch (base + (t < longer)) {
      case 6: dot_tile<vectors, 6>(c, p, m0); break;
      case 5: dot_tile<vectors, 5>(c, p, m0); break;
      case 4: dot_tile<vectors, 4>(c, p, m0); break;
      case 3: dot_tile<vectors, 3>(c, p, m0); break;
      case 2: dot_tile<vectors, 2>(c, p, m0); break;
      default: dot_tile<vectors, 1>(c, p, m0);
    }
  }
}

// Panels [begin, end) of kPanelRows weight rows (the last may hold fewer: its missing rows are zero and not stored),
// each expanded once and multiplied by all M rows of x.
template <typename weight_t, typename scale_t>
void panel_tasks(const Call& c, const weight_t* qw, const scale_t* scale, const scale_t* mins, int64_t begin,
                 int64_t end) {
  const int64_t K = c.K, groups = c.groups;
  // 64-byte aligned: a vector load across two cache lines costs two
  const at::Tensor buffer = at::empty({kPanelRows * K / 2 + 2 * kPanelRows * groups}, at::kFloat);
  auto* words = reinterpret_cast<uint16_t*>(buffer.data_ptr<float>());
  float* panel_scale = buffer.data_ptr<float>() + kPanelRows * K / 2;
  float* panel_mins = panel_scale + kPanelRows * groups;
  std::vector<float> row_scale(groups), row_mins(groups);
  const float offset = weight_offset(qw);
  const int64_t row_bytes = std::is_same<weight_t, uint8_t>::value ? K / 2 : K;  // 4-bit pairs or int8
  __m512i pair[16];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n0 = t * kPanelRows, valid = std::min(kPanelRows, c.N - n0);
    for (int64_t r = 0; r < kPanelRows; ++r) {
      const float* s = r < valid ? as_float(scale + (n0 + r) * groups, groups, row_scale.data()) : nullptr;
      const float* m = r < valid ? as_float(mins + (n0 + r) * groups, groups, row_mins.data()) : nullptr;
      for (int64_t g = 0; g < groups; ++g) {
        panel_scale[g * kPanelRows + r] = s ? s[g] : 0.0f;
        panel_mins[g * kPanelRows + r] = s ? m[g] - offset * s[g] : 0.0f;
      }
    }
    const int vectors = valid > kLanes ? 2 : 1;
    // The next panel's rows are one run of memory: prefetched a share per block expanded here, since 16 rows read
    // at a stride are more streams than the hardware prefetcher follows (the 8-bit LM head, 28 MB, waited on DRAM)
    const char* next = reinterpret_cast<const char*>(qw) + (n0 + kPanelRows) * row_bytes;
    const int64_t next_lines = t + 1 < end ? (std::min(kPanelRows, c.N - n0 - kPanelRows) * row_bytes + 63) / 64 : 0;
    const int64_t lines_per_block = (next_lines + vectors * (K / kBlock) - 1) / (vectors * (K / kBlock));
    int64_t line = 0;
    for (int j = 0; j < vectors; ++j) {
      const int rows = static_cast<int>(std::min<int64_t>(kLanes, valid - j * kLanes));
      uint16_t* half = words + j * K * kLanes;
      for (int64_t b = 0; b < K / kBlock; ++b) {
        for (int64_t i = 0; i < lines_per_block && line < next_lines; ++i, ++line)
          _mm_prefetch(next + line * 64, _MM_HINT_T0);
        expand_block(qw, n0 + j * kLanes, rows, K, b, pair);
        for (int d = 0; d < 16; ++d) _mm512_store_si512(half + (b * 16 + d) * 2 * kLanes, pair[d]);
      }
    }
    const Panel panel{words, panel_scale, panel_mins, n0, valid};
    if (vectors == 2) panel_rows<2>(c, panel);
    else panel_rows<1>(c, panel);
  }
}

// x's sums over each group of K, [M, groups] float32 (bf16 widened exactly, summed in float32)
at::Tensor group_sums(const at::Tensor& x, int64_t G) {
  const int64_t M = x.size(0), K = x.size(1), groups = (K + G - 1) / G;
  auto sums = at::zeros({M, groups}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  float* s = sums.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += kBlock) {
      const __m512i v = _mm512_loadu_si512(xp + m * K + k);
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));  // even bf16 -> float32
      const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536)));  // odd
      s[m * groups + k / G] += _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  return sums;
}
#else
#define GENSERVE_DPBF16 0
#endif  // GENSERVE_DPBF16

// Whether this build can run int4_linear_dpbf16: compiled for a CPU with AVX512-BF16 and -VBMI (-march=native).
bool has_avx512_bf16() { return GENSERVE_DPBF16; }

// x: [M, K] bfloat16; qweight / scale / min as int4_linear (grouped_operands.h); bias [N] -> [M, N] bfloat16.
// Products of bf16 x and the exact weights summed in float32 (int4_linear_amx multiplies the weights rounded to bf16).
at::Tensor int4_linear_dpbf16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                              const at::Tensor& mins, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(has_avx512_bf16(), "int4_linear_dpbf16: this CPU or build has no AVX512-BF16 and -VBMI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_linear_dpbf16: x [M, K] bfloat16");
  const auto op = check_grouped_operands(qweight, scale, mins, x.size(1), group_size, "int4_linear_dpbf16");
  const int64_t M = x.size(0), N = op.N, K = op.K, G = op.G;
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
#if GENSERVE_DPBF16
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto xc = x.contiguous();
  const at::Tensor bias_f = float_bias(bias, N);
  const at::Tensor sums = group_sums(xc, G);
  const Call call{reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()), sums.data_ptr<float>(),
                  bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr<c10::BFloat16>(),
                  M, N, K, G, sums.size(1)};
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  with_typed_operands(op, qw, s, mn, [&](const auto* q, const auto* sc, const auto* mi) {
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) { panel_tasks(call, q, sc, mi, begin, end); });
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
