// Decode attention that reads K/V straight from the paged pool through block tables (CPU).
//
// The pure-PyTorch path gathers every context into a padded [B, KVH, L, D] copy, then runs SDPA
// over it: three passes over the context (read pool, write copy, read copy), padded to the longest
// sequence. Here each (sequence, KV head) work item reads its own rows in place, and the query heads
// that share the KV head find them in cache. Scores and softmax in float32 for every dtype.
// SmolLM2 fp32, batch 32, contexts 100-228, 30 layers, 2 threads: 27-30 ms -> 9.5 ms (bf16: 21 -> 11).
// On an AVX2 EPYC (no AVX-512), one thread, per layer: 2.4 ms -> 0.63 ms fp32 (about the memory's
// bandwidth), 2.5 -> 1.0 ms bf16, once the vectors are the ISA's width (16-float ones spilled there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "decode_attention.h"

namespace {

using namespace genserve_attention;

template <int D, typename scalar_t>
void decode_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& tables, const at::Tensor& lens, at::Tensor& out, int64_t block_size,
                float scale, const ScoreMods& mods) {
  const int64_t batch = q.size(0), num_heads = q.size(1), num_kv_heads = k_cache.size(1);
  const int64_t group = num_heads / num_kv_heads, max_blocks = tables.size(1);
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  const int64_t* table_ptr = tables.data_ptr<int64_t>();
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  // a wrong table would read outside the pool: check every block the contexts read (a few hundred ints);
  // blocks wholly before a sliding window are never read, and may be gone
  const int64_t pool_blocks = k_cache.size(0) / block_size;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_ptr[b] >= 1 && len_ptr[b] <= max_blocks * block_size,
                "paged_decode_attention: context length ", len_ptr[b], " outside 1..", max_blocks * block_size);
    const int64_t first = mods.window > 0 ? std::max<int64_t>(0, len_ptr[b] - mods.window) : 0;
    for (int64_t blk = first / block_size; blk * block_size < len_ptr[b]; ++blk) {
      const int64_t id = table_ptr[b * max_blocks + blk];
      TORCH_CHECK(id >= 0 && id < pool_blocks, "paged_decode_attention: block ", id, " outside the pool");
    }
  }
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t offset = (b * num_heads + h * group) * D;
      decode_one<D, scalar_t>(q_ptr + offset, k_ptr, v_ptr, table_ptr + b * max_blocks, len_ptr[b],
                              out_ptr + offset, num_kv_heads, h, group, block_size, scale, mods, scores, rows);
    }
  });
}

template <typename scalar_t>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& tables, const at::Tensor& lens, at::Tensor& out, int64_t block_size,
                       float scale, const ScoreMods& mods) {
  switch (q.size(2)) {
    case 64: decode_all<64, scalar_t>(q, k_cache, v_cache, tables, lens, out, block_size, scale, mods); break;
    case 128: decode_all<128, scalar_t>(q, k_cache, v_cache, tables, lens, out, block_size, scale, mods); break;
    case 256: decode_all<256, scalar_t>(q, k_cache, v_cache, tables, lens, out, block_size, scale, mods); break;
    default: TORCH_CHECK(false, "paged_decode_attention: head_dim must be 64, 128 or 256");
  }
}

// q: [B, H, D]; k_cache, v_cache: [slots, KVH, D]; block_tables: [B, max_blocks] int64;
// context_lens: [B] int64 (each >= 1); window: 0 or a sliding window in tokens; softcap: 0 or the cap;
// alibi_slopes: None or [H] float32 -> [B, H, D]
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size, double scale, int64_t window, double softcap,
                                  const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q [B,H,D], caches [slots,KVH,D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "one dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.dim() == 1 &&
              context_lens.size(0) == q.size(0), "one block-table row and one context length per query");
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "the pool holds whole blocks of block_size");
  TORCH_CHECK(window >= 0 && softcap >= 0, "paged_decode_attention: window and softcap must be >= 0");
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0 && k_cache.size(2) == head_dim, "head shapes");
  ScoreMods mods;
  mods.window = window;
  mods.softcap = static_cast<float>(softcap);
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->contiguous();
    TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.dim() == 1 && slopes.size(0) == q.size(1),
                "paged_decode_attention: alibi_slopes must be float32 [num_heads]");
    mods.slopes = slopes.data_ptr<float>();
  }
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: dispatch_head_dim<float>(q, k_cache, v_cache, tables, lens, out, block_size, s, mods); break;
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16>(q, k_cache, v_cache, tables, lens, out, block_size, s, mods);
      break;
    case at::kHalf: dispatch_head_dim<c10::Half>(q, k_cache, v_cache, tables, lens, out, block_size, s, mods); break;
    default: TORCH_CHECK(false, "paged_decode_attention: float32, bfloat16 or float16 only");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(genserve_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale, int window=0, float softcap=0.0, "
        "Tensor? alibi_slopes=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
