// Float vectors of the CPU's native width for genserve's kernels, and loads that widen to float32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

// On the loops both the op-by-op kernels and llama_decode_cpu.cpp run: never inlined and never cloned, so every
// caller runs the one copy the linker keeps (the symbols are weak), and both paths round alike to the bit. Inlined,
// or cloned for a caller's constant arguments (GCC's IPA-CP made a `.constprop` copy of the panel kernel for
// llama_decode's bias-less calls, which rounded 8-bit LM-head logits apart), the compiler is free to vectorize a
// reduction differently at each call site.
#if defined(__clang__)
#define GENSERVE_SHARED __attribute__((noinline))
#else
#define GENSERVE_SHARED __attribute__((noinline, noclone))
#endif

namespace genserve_simd {

// One native SIMD register of floats: 16 with AVX-512, 8 otherwise (AVX2, NEON pairs). A wider generic
// vector than the ISA has is split by the compiler, and its arrays spill to the stack.
#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vfloat __attribute__((vector_size(W * 4)));
typedef uint16_t vu16 __attribute__((vector_size(W * 2)));
typedef uint32_t vu32 __attribute__((vector_size(W * 4)));
typedef int8_t vi8 __attribute__((vector_size(W)));
typedef int32_t vi32 __attribute__((vector_size(W * 4)));

inline vfloat loadv(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vfloat loadv(const c10::BFloat16* p) {  // bf16 is the top half of a float
  vu16 bits;
  std::memcpy(&bits, p, sizeof(bits));
  vu32 wide = __builtin_convertvector(bits, vu32) << 16;
  vfloat v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
inline vfloat loadv(const c10::Half* p) {
  float tmp[W];
  for (int i = 0; i < W; ++i) tmp[i] = static_cast<float>(p[i]);
  return loadv(tmp);
}
inline vfloat loadv(const int8_t* p) {  // GCC scalarizes the generic int8 -> float conversion on x86
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return reinterpret_cast<vfloat>(
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  vi8 bytes;
  std::memcpy(&bytes, p, sizeof(bytes));
  return __builtin_convertvector(__builtin_convertvector(bytes, vi32), vfloat);
#endif
}
// Weight rows a tile ahead into the cache: a long matrix (an LM head) streams from DRAM, where the hardware
// prefetcher alone leaves a row-at-a-time thread waiting on memory (2-3x on [49152, 576] int8, one row).
// Non-temporal: a decode step streams ~100 MB of weights that are read once, and a temporal fetch pushes out
// what is read again (the Python interpreter's working set, the K/V rows, the activations). Paired step by step
// on Zen 3 (SmolLM2 Q4_1, one stream), NTA one tile ahead against T0 two tiles ahead: x0.97 (int8 activations)
// and x0.95 (float); without the prefetch a step took x1.35.
inline void prefetch_bytes(const void* start, int64_t bytes) {
#if defined(__AVX2__)
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(p + offset, _MM_HINT_NTA);
#endif
}

// How many tasks ahead the row kernels (grouped_row_tasks, q8_tasks) prefetch their weights: 1 suited Zen 3 (4
// and 8 were x1.05 and x1.08 slower there), 2-4 a Xeon with AMX (x0.94 per token). Process-wide, chosen on a single
// stream's first decode steps (grouped_linear.PrefetchTuner) or fixed by GENSERVE_PREFETCH_DISTANCE; written only
// between kernel calls, so a plain variable.
inline int64_t& prefetch_distance() {
  static int64_t tasks = 1;
  return tasks;
}

// one scale or min as float32 (c10's Half conversion is bit arithmetic; F16C does it in one instruction)
inline float widen(float v) { return v; }
inline float widen(c10::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

#if defined(__AVX512F__)
// 16 rows of 16 bytes (row r at block + r * stride; rows from `rows` on read as zero) -> dword[i], lane l = row l's
// bytes 4i .. 4i + 3: a 16 x 4 dword transpose. Both panel kernels expand 4-bit blocks through it (a row's block:
// byte j holds k = j in its low nibble, k = j + 16 in its high one).
inline void transpose_dwords_16x4(const uint8_t* block, int64_t stride, int rows, __m512i* dword) {
  auto row = [&](int r) {
    return r < rows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + r * stride)) : _mm_setzero_si128();
  };
  __m512i quad[4];  // quad[a], 128-bit lane l: row 4a + l
  for (int a = 0; a < 4; ++a)
    quad[a] = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(row(4 * a)),
                                                                       row(4 * a + 1), 1), row(4 * a + 2), 2),
                                 row(4 * a + 3), 3);
  // element s of d01: row s % 8's dword s / 8 (of quad[0] | quad[1]: element 4r + c = row r's dword c)
  const __m512i d01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i d23 = _mm512_add_epi32(d01, _mm512_set1_epi32(2));
  const __m512i p01 = _mm512_permutex2var_epi32(quad[0], d01, quad[1]);
  const __m512i p23 = _mm512_permutex2var_epi32(quad[0], d23, quad[1]);
  const __m512i q01 = _mm512_permutex2var_epi32(quad[2], d01, quad[3]);
  const __m512i q23 = _mm512_permutex2var_epi32(quad[2], d23, quad[3]);
  dword[0] = _mm512_shuffle_i64x2(p01, q01, 0x44);
  dword[1] = _mm512_shuffle_i64x2(p01, q01, 0xEE);
  dword[2] = _mm512_shuffle_i64x2(p23, q23, 0x44);
  dword[3] = _mm512_shuffle_i64x2(p23, q23, 0xEE);
}
#endif

inline float hsum(vfloat v) {
  float total = 0.f;
  for (int i = 0; i < W; ++i) total += v[i];
  return total;
}

}  // namespace genserve_simd
