// y = x @ W^T (+ bias) for grouped 4-bit / 8-bit weights (grouped_dot.h's layout) and bfloat16 activations, on
// Intel AMX tiles (Sapphire Rapids and later). A batch of bf16 rows (32 decode streams, a short prefill) reads each
// weight once per call, like int4_linear's float panels, but those panels' FMAs set the pace, and on a CPU whose
// bf16 GEMM runs on AMX, oneDNN's bf16 linear beat them ~10x at 32 rows. Here each thread dequantizes panels of 32
// weight rows to bfloat16 (w = q * scale + min in float32, one rounding to bf16, as a bf16 checkpoint of those
// weights holds them) and multiplies them on the tiles, summing in float32.
//
// The tiles compute C^T = W x^T: weights are the A operand (16 weight rows x 32 k per tile, each dequantized block
// of 32 values one tile row), x the B operand in AMX's pair-interleaved layout (16 k pairs x 16 activation rows),
// built once per call; the C tiles are transposed in registers on the way out.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "grouped_bf16.h"
#include "grouped_dot.h"
#include "grouped_operands.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define GENSERVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#else
#define GENSERVE_AMX 0
#endif

namespace {

using namespace genserve_grouped;
#if GENSERVE_AMX
using namespace genserve_bf16;
#endif

#if GENSERVE_AMX

// Linux gives a process the AMX tile state only on request; without it the first tile instruction raises SIGILL.
// A refusal (an old kernel, or ENOSPC: a thread's alternate signal stack too small for the tile state) is said
// once, and the float kernels serve.
bool amx_permitted() {
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return true;
    TORCH_WARN("AMX tile state refused by the kernel (arch_prctl errno ", errno, "): grouped weights keep the "
               "float kernels");
    return false;
  }();
  return granted;
}

// palette 1: eight tiles of 16 rows x 64 bytes. Tiles 0-3 accumulate C[weight tile][x tile], 4-5 hold two weight
// tiles (A), 6-7 two x tiles (B).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

constexpr int64_t kTile = 16;        // rows of a tile
constexpr int64_t kChunk = 32;       // k values per tile row (64 bytes of bf16)
constexpr int64_t kPanelRows = 32;   // weight rows a thread dequantizes at once: two A tiles
constexpr int64_t kTileBlock = kTile * kChunk;  // bf16 values of one tile

// Tile rows must not straddle cache lines: a 64-byte row split over two lines made tile loads 3x slower. One
// 64-byte aligned buffer per thread and use, kept across calls and grown when needed.
template <int use>
uint16_t* thread_buffer(size_t bytes) {
  struct Buffer {
    ~Buffer() { std::free(data); }
    void* data = nullptr;
    size_t size = 0;
  };
  thread_local Buffer buffer;
  if (buffer.size < bytes) {
    const size_t size = (bytes + 63) / 64 * 64;
    void* data = std::aligned_alloc(64, size);
    TORCH_CHECK(data, "int4_linear_amx: out of memory for ", bytes, " bytes of tiles");
    std::free(buffer.data);
    buffer.data = data;
    buffer.size = size;
  }
  return static_cast<uint16_t*>(buffer.data);
}
enum BufferUse { kPanels, kScales, kActivations };

// x [M, K] bf16 -> B tiles [ceil(M / 16)][K / 32][16 k pairs][16 rows][2], zero past M
void interleave_activations(const uint16_t* x, int64_t M, int64_t K, uint16_t* tiles) {
  const int64_t m_tiles = (M + kTile - 1) / kTile, chunks = K / kChunk;
  std::memset(tiles, 0, m_tiles * chunks * kTile * kChunk * sizeof(uint16_t));
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* tile_column = tiles + (m / kTile) * chunks * kTile * kChunk + (m % kTile) * 2;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t pair = 0; pair < kChunk / 2; ++pair)  // a k pair of this row: 4 bytes
        std::memcpy(tile_column + (c * kTile + pair) * kTile * 2, x + m * K + c * kChunk + pair * 2, 4);
  }
}

// a 16 x 16 float block transposed in registers: unpack pairs, then pairs of pairs, then 128-bit lanes twice
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

// out[m0 + m, n0 + r] = C[r][m] + bias[n0 + r]: one finished accumulator tile, transposed in registers so each
// output row is one 32-byte store
inline void store_tile(const float* c, const float* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t n0,
                       int64_t m0) {
  __m512 r[kTile];
  for (int i = 0; i < kTile; ++i) r[i] = _mm512_load_ps(c + i * kTile);
  transpose16(r);
  const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
  for (int64_t m = 0; m < std::min(kTile, M - m0); ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + m) * N + n0),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(r[m], b))));
}

// One panel's products: rows (16 or 32) weight rows in tile order at `w`, against every x tile, into out. Two x tiles
// by two weight tiles at a time in the four accumulators; after each k chunk, `between()` (the next panel's due
// rows of dequantization, so the vector units work while the tiles do).
template <typename Between>
void multiply_panel(const uint16_t* w, int64_t rows, const uint16_t* x_tiles, int64_t m_tiles, int64_t chunks,
                    const float* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t n0, Between&& between) {
  const int64_t x_tile_stride = chunks * kTileBlock;  // bf16 values per x tile column of chunks
  const uint16_t* a0 = w;
  const uint16_t* a1 = w + chunks * kTileBlock;
  const bool two_w = rows == kPanelRows;
  alignas(64) float c[kTile * kTile];
  auto store = [&](int64_t row_tile, int64_t m_tile) {
    store_tile(c, bias, out, M, N, n0 + row_tile * kTile, m_tile * kTile);
  };
  for (int64_t mt = 0; mt < m_tiles; mt += 2) {
    const bool two_x = mt + 1 < m_tiles;
    const uint16_t* b0 = x_tiles + mt * x_tile_stride;
    const uint16_t* b1 = b0 + x_tile_stride;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      _tile_loadd(4, a0 + ch * kTileBlock, 64);
      _tile_loadd(6, b0 + ch * kTileBlock, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (two_x) {
        _tile_loadd(7, b1 + ch * kTileBlock, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (two_w) {
        _tile_loadd(5, a1 + ch * kTileBlock, 64);
        _tile_dpbf16ps(2, 5, 6);
        if (two_x) _tile_dpbf16ps(3, 5, 7);
      }
      between();
    }
    _tile_stored(0, c, kTile * sizeof(float));
    store(0, mt);
    if (two_x) {
      _tile_stored(1, c, kTile * sizeof(float));
      store(0, mt + 1);
    }
    if (two_w) {
      _tile_stored(2, c, kTile * sizeof(float));
      store(1, mt);
      if (two_x) {
        _tile_stored(3, c, kTile * sizeof(float));
        store(1, mt + 1);
      }
    }
  }
}

// Spreads `rows` of work evenly over `steps` calls of due(), in integers: after call i, rows * i / steps are due.
struct EvenPace {
  int64_t rows, steps, owed = 0, done = 0;
  int64_t due() {
    for (owed += rows; owed >= steps; owed -= steps) ++done;
    return done;
  }
};

// Panels [begin, end) of kPanelRows weight rows (the last may hold 16), all M rows of x against each. The next
// panel is dequantized while the tiles multiply this one, a few rows per k chunk: the tiles then read rows
// written a panel earlier, not ones still in the store buffer (timed alone, x0.77 of dequantize-then-multiply).
template <typename weight_t, typename scale_t>
void amx_panel_tasks(const uint16_t* x_tiles, const weight_t* qw, const scale_t* scale, const scale_t* mins,
                     const float* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K, int64_t G,
                     int64_t begin, int64_t end) {
  constexpr int64_t kPacking = std::is_same<weight_t, uint8_t>::value ? 2 : 1;
  const int64_t num_groups = (K + G - 1) / G, chunks = K / kChunk, m_tiles = (M + kTile - 1) / kTile;
  uint16_t* panels = thread_buffer<kPanels>(2 * kPanelRows * K * sizeof(uint16_t));
  float* scale_f = reinterpret_cast<float*>(thread_buffer<kScales>(2 * num_groups * sizeof(float)));
  float* mins_f = scale_f + num_groups;
  auto panel = [&](int64_t t) { return panels + (t % 2) * kPanelRows * K; };
  auto rows_of = [&](int64_t t) { return t < end ? std::min(kPanelRows, N - t * kPanelRows) : 0; };
  // rows [from, to) of panel t into its buffer, each row's blocks to its row of the panel's tiles
  auto dequantize_rows = [&](int64_t t, int64_t from, int64_t to) {
    for (int64_t r = from; r < to; ++r) {
      const int64_t n = t * kPanelRows + r;
      const float* sf = as_float(scale + n * num_groups, num_groups, scale_f);
      const float* mf = as_float(mins + n * num_groups, num_groups, mins_f);
      dequantize_row_bf16(qw + n * (K / kPacking), sf, mf, K, G, num_groups,
                          panel(t) + (r / kTile) * chunks * kTileBlock + (r % kTile) * kChunk, kTileBlock);
    }
  };
  configure_tiles();
  dequantize_rows(begin, 0, rows_of(begin));
  for (int64_t t = begin; t < end; ++t) {
    EvenPace next{rows_of(t + 1), ((m_tiles + 1) / 2) * chunks};
    int64_t next_done = 0;
    multiply_panel(panel(t), rows_of(t), x_tiles, m_tiles, chunks, bias, out, M, N, t * kPanelRows, [&] {
      const int64_t due = next.due();
      dequantize_rows(t + 1, next_done, due);
      next_done = due;
    });
    dequantize_rows(t + 1, next_done, next.rows);
  }
  _tile_release();
}

#endif  // GENSERVE_AMX

// Whether this build and this process can run int4_linear_amx: the CPU has AMX-BF16, the kernels were compiled for
// it, and Linux granted the tile state.
bool has_amx_bf16() {
#if GENSERVE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// x: [M, K] bfloat16; qweight / scale / min as int4_linear (grouped_operands.h), N % 16 == 0; bias [N] -> [M, N]
// bfloat16. Results are bf16 products summed in float32: close to, not equal to, int4_linear's float32 ones.
at::Tensor int4_linear_amx(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& mins, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(has_amx_bf16(), "int4_linear_amx: this CPU, build or process has no AMX-BF16 tiles");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_linear_amx: x [M, K] bfloat16");
  const auto op = check_grouped_operands(qweight, scale, mins, x.size(1), group_size, "int4_linear_amx");
  TORCH_CHECK(op.N % 16 == 0, "int4_linear_amx: N must be a multiple of 16");
  const int64_t M = x.size(0), N = op.N, K = op.K, G = op.G;
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
#if GENSERVE_AMX
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto xc = x.contiguous();
  const at::Tensor bias_f = float_bias(bias, N);
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  uint16_t* x_tiles = thread_buffer<kActivations>(((M + kTile - 1) / kTile) * kTile * K * sizeof(uint16_t));
  interleave_activations(reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()), M, K, x_tiles);
  auto* o = out.data_ptr<c10::BFloat16>();
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  with_typed_operands(op, qw, s, mn, [&](const auto* q, const auto* sc, const auto* mi) {
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      amx_panel_tasks(x_tiles, q, sc, mi, b, o, M, N, K, G, begin, end);
    });
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve_cpu, m) {
  m.def("has_amx_bf16() -> bool", &has_amx_bf16);  // no tensor to dispatch on: one catch-all kernel
  m.def("int4_linear_amx(Tensor x, Tensor qweight, Tensor scale, Tensor mins, int group_size, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) {
  m.impl("int4_linear_amx", &int4_linear_amx);
}
