// One (sequence, KV head) work item of paged decode attention (paged_attention_cpu.cpp), shared with
// llama_decode_cpu.cpp's fused decode step.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace genserve_attention {

using namespace genserve_simd;

// What a layer changes in its scores: a sliding window, soft-capping, ALiBi (0 / nullptr: off).
struct ScoreMods {
  int64_t window = 0;             // keys at positions (p - window, p] only
  float softcap = 0.f;            // s = softcap * tanh(s / softcap)
  const float* slopes = nullptr;  // [H]: s += slope * (key position - query position)
};

// One sequence and one KV head: its `group` query heads against the context (its last `window` tokens
// with a sliding window). One query head at a time, so the query (scores pass) or the output row
// (values pass) stays in registers; the K/V rows come from memory for the first head and from cache
// for the others.
template <int D, typename scalar_t>
GENSERVE_SHARED void decode_one(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* table,
                int64_t context_len, scalar_t* out, int64_t num_kv_heads, int64_t kv_head, int64_t group,
                int64_t block_size, float scale, const ScoreMods& mods, std::vector<float>& scores,
                std::vector<int64_t>& rows) {
  constexpr int V = D / W;
  const int64_t row_stride = num_kv_heads * D;
  const int64_t first = mods.window > 0 ? std::max<int64_t>(0, context_len - mods.window) : 0;
  const int64_t count = context_len - first;
  rows.resize(count);  // offset of each visible token's row for this KV head (K and V alike)
  for (int64_t t = first; t < context_len;) {  // one block (or the window's part of one) at a time
    const int64_t offset = t % block_size;
    int64_t row = ((table[t / block_size] * block_size + offset) * num_kv_heads + kv_head) * D;
    const int64_t n = std::min(block_size - offset, context_len - t);
    for (int64_t j = 0; j < n; ++j, ++t, row += row_stride) rows[t - first] = row;
  }
  scores.resize(count);
  const float query_pos = static_cast<float>(context_len - 1);
  for (int64_t g = 0; g < group; ++g) {
    vfloat qv[V];
    for (int i = 0; i < V; ++i) qv[i] = loadv(q + g * D + i * W) * scale;
    float* s = scores.data();
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t* key = k_cache + rows[i];
      vfloat acc = qv[0] * loadv(key);
      for (int j = 1; j < V; ++j) acc += qv[j] * loadv(key + j * W);
      s[i] = hsum(acc);
    }
    // in their own loops, which GCC vectorizes (tanh through libmvec): per score they cost more than the dot
    if (mods.softcap > 0.f) {
      const float cap = mods.softcap, inv_cap = 1.f / mods.softcap;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) s[i] = cap * std::tanh(s[i] * inv_cap);
    }
    if (mods.slopes) {
      const float slope = mods.slopes[kv_head * group + g], start = static_cast<float>(first) - query_pos;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) s[i] += slope * (start + static_cast<float>(i));
    }
    float row_max = -std::numeric_limits<float>::max();
#pragma omp simd reduction(max : row_max)
    for (int64_t i = 0; i < count; ++i) row_max = std::max(row_max, s[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < count; ++i) {
      s[i] = std::exp(s[i] - row_max);
      sum += s[i];
    }
    vfloat ov[V];
    for (int i = 0; i < V; ++i) ov[i] = vfloat{};
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t* value = v_cache + rows[i];
      const float p = s[i];
      for (int j = 0; j < V; ++j) ov[j] += p * loadv(value + j * W);
    }
    const float inv = 1.f / sum;
    float row[D];
    for (int i = 0; i < V; ++i) {
      const vfloat o = ov[i] * inv;
      std::memcpy(row + i * W, &o, sizeof(o));
    }
    for (int d = 0; d < D; ++d) out[g * D + d] = static_cast<scalar_t>(row[d]);
  }
}

}  // namespace genserve_attention
