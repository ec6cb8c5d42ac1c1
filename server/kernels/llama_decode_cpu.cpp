// A whole decode step of a Llama-family layer stack over grouped 4/8-bit weights in one call (CPU): for each layer,
// residual add + RMSNorm, the fused q|k|v matmul, rotary embedding, the new K/V into the paged pool, paged
// attention, o_proj, residual add + RMSNorm, gate|up, SiLU * up, down; then the final RMSNorm.
//
// Why: run op by op from Python, one token of a 30-layer model is ~2,000 ATen calls and ~150 OpenMP regions, and
// between two regions the Python in between lets the worker threads fall asleep, so each region pays a wake-up.
// For one stream that overhead is larger than the matmuls. Here one OpenMP team lives for the whole step and its
// threads meet at spinning barriers between the phases, the way llama.cpp runs its graph.
//
// The arithmetic is the op-by-op path's, from the same inner loops (grouped_dot.h, int8_dot.h,
// decode_attention.h, elementwise.h): the outputs are the same to the bit (tests/server/test_llama_decode.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <sched.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "decode_attention.h"
#include "elementwise.h"
#include "grouped_dot.h"
#include "grouped_operands.h"
#include "int8_dot.h"

namespace {

using genserve_int8::QuantizedRow;

// One grouped linear's operands (int4_linear's layout), checked once per call.
struct Linear : genserve_grouped::GroupedOperands {
  const void* q = nullptr;
  const void* scale = nullptr;
  const void* mins = nullptr;
};

Linear make_linear(const at::Tensor& q, const at::Tensor& s, const at::Tensor& m, int64_t G, int64_t K,
                   int64_t layer, const char* what) {
  const std::string name = "llama_decode: layer " + std::to_string(layer) + " " + what;
  Linear L;
  static_cast<genserve_grouped::GroupedOperands&>(L) = genserve_grouped::check_grouped_operands(q, s, m, K, G, name);
  TORCH_CHECK(q.is_contiguous() && s.is_contiguous() && m.is_contiguous(), name, ": contiguous weight, scale and min");
  L.q = q.data_ptr();
  L.scale = s.data_ptr();
  L.mins = m.data_ptr();
  return L;
}

template <typename F>
void with_types(const Linear& L, F&& f) {
  const auto* q4 = static_cast<const uint8_t*>(L.q);
  const auto* q8 = static_cast<const int8_t*>(L.q);
  if (L.half_scales) {
    const auto* s = static_cast<const c10::Half*>(L.scale);
    const auto* m = static_cast<const c10::Half*>(L.mins);
    if (L.four_bit) f(q4, s, m);
    else f(q8, s, m);
  } else {
    const auto* s = static_cast<const float*>(L.scale);
    const auto* m = static_cast<const float*>(L.mins);
    if (L.four_bit) f(q4, s, m);
    else f(q8, s, m);
  }
}

inline void share(int64_t total, int tid, int nt, int64_t& begin, int64_t& end) {
  begin = total * tid / nt;
  end = total * (tid + 1) / nt;
}

// The step's threads meet 5 times per layer, a few microseconds to a few hundred apart. OpenMP's barrier spins
// GOMP_SPINCOUNT times (3,000, cpu_env.py: right for op-by-op batches on a shared host) and then sleeps, so a
// thread often slept through a phase and paid a wake-up (then 9 barriers per layer): ~7.5-10.5 ms per step against 6.6 ms with
// OMP_WAIT_POLICY=ACTIVE (SmolLM2 Q4_1, 2 threads). This one spins with `pause` for ~1 ms, then yields the core
// (a preempted partner gets it back), and never sleeps: llama.cpp's barrier does the same.
struct SpinBarrier {
  std::atomic<int> arrived{0};
  std::atomic<int> generation{0};
  int threads = 1;

  void wait() {
    const int gen = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 20000) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        sched_yield();
      }
    }
  }
};

// Each thread's buffers.
struct Scratch {
  std::vector<float> panel, ws, scores;
  std::vector<int64_t> rows;
};

// What the linear reads besides x: per-group sums (float activations, one row) or int8 rows; one thread.
void prepare_input(const Linear& L, const float* x, int64_t M, bool int8, float* xsum, QuantizedRow* xq) {
  if (int8) {
    for (int64_t m = 0; m < M; ++m) genserve_int8::quantize_row(x + m * L.K, L.K, L.G, L.four_bit, xq[m]);
  } else if (M == 1) {
    genserve_grouped::group_sums(x, 1, L.K, L.G, xsum);
  }
}

// This thread's share of out [M, N] = x [M, K] @ W^T, with the kernel int4_linear (or its int8-activation
// variant) would pick for M rows.
void run_linear(const Linear& L, const float* x, const float* xsum, const QuantizedRow* xq, int64_t M, bool int8,
                float* out, int tid, int nt, Scratch& s) {
  with_types(L, [&](const auto* q, const auto* scale, const auto* mins) {
    int64_t begin, end;
    if (int8) {
      share(L.N / genserve_int8::kRows, tid, nt, begin, end);
      genserve_int8::q8_tasks(xq, q, scale, mins, nullptr, out, M, L.N, L.K, L.G, begin, end, s.ws.data());
    } else if (M < genserve_grouped::kPanelMinRows) {
      share(L.N / genserve_grouped::kRowsPerTask, tid, nt, begin, end);
      genserve_grouped::grouped_row_tasks(x, xsum, q, scale, mins, nullptr, out, L.N, L.K, L.G, begin, end);
    } else {
      share(genserve_grouped::panels_of(L.N), tid, nt, begin, end);
      genserve_grouped::grouped_panel_tasks(x, q, scale, mins, nullptr, out, M, L.N, L.K, L.G, begin, end,
                                            s.panel.data());
    }
  });
}

// rotary.py's arithmetic: x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product rounded on its own as PyTorch
// rounds it (no fused multiply-add, which the compiler would otherwise form here)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void rotate_heads(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* x1 = x + h * head_dim;
    float* x2 = x1 + half;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x1[i], b = x2[i];
      const float r1 = a * cos[i] - b * sin[i];
      const float r2 = b * cos[i] + a * sin[i];
      x1[i] = r1;
      x2[i] = r2;
    }
  }
}
#pragma GCC pop_options

void attend(int64_t head_dim, const float* q, const float* k_cache, const float* v_cache, const int64_t* table,
            int64_t context_len, float* out, int64_t num_kv_heads, int64_t kv_head, int64_t group,
            int64_t block_size, float scale, Scratch& s) {
  const genserve_attention::ScoreMods mods;
  switch (head_dim) {
    case 64:
      genserve_attention::decode_one<64, float>(q, k_cache, v_cache, table, context_len, out, num_kv_heads, kv_head,
                                                group, block_size, scale, mods, s.scores, s.rows);
      break;
    case 128:
      genserve_attention::decode_one<128, float>(q, k_cache, v_cache, table, context_len, out, num_kv_heads, kv_head,
                                                 group, block_size, scale, mods, s.scores, s.rows);
      break;
    default:
      genserve_attention::decode_one<256, float>(q, k_cache, v_cache, table, context_len, out, num_kv_heads, kv_head,
                                                 group, block_size, scale, mods, s.scores, s.rows);
  }
}

// hidden: [B, hidden] float32 (the embeddings of the step's tokens, one per sequence); positions: [B];
// norms: 2 per layer (input, post-attention) + the final one, float32 [hidden]; qweights / scales / mins /
// group_sizes: 4 per layer (qkv, o, gate_up, down); k_caches / v_caches: one each per layer, float32
// [slots, KVH, D]; cos_sin: [max_positions, D] float32 (cos | sin); slot_mapping / block_tables / context_lens:
// the step's paged attention inputs (int64) -> the final norm's output [B, hidden].
at::Tensor llama_decode(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList norms,
                        at::TensorList qweights, at::TensorList scales, at::TensorList mins,
                        c10::IntArrayRef group_sizes, at::TensorList k_caches, at::TensorList v_caches,
                        const at::Tensor& cos_sin, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                        const at::Tensor& context_lens, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                        double attn_scale, double eps, bool int8_activations) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L > 0 && v_caches.size() == k_caches.size() && norms.size() == static_cast<size_t>(2 * L + 1) &&
                  qweights.size() == static_cast<size_t>(4 * L) && scales.size() == qweights.size() &&
                  mins.size() == qweights.size() && group_sizes.size() == qweights.size(),
              "llama_decode: per layer 2 norms, 4 linears, a K and a V cache; plus the final norm");
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "llama_decode: hidden [B, hidden] float32");
  const int64_t B = hidden.size(0), Hd = hidden.size(1);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "llama_decode: heads a multiple of KV heads");
  const at::Tensor& k0 = k_caches[0];
  TORCH_CHECK(k0.dim() == 3 && k0.size(1) == num_kv_heads, "llama_decode: caches [slots, KVH, D]");
  const int64_t D = k0.size(2), slots = k0.size(0);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "llama_decode: head_dim 64, 128 or 256");
  TORCH_CHECK(block_size > 0 && slots % block_size == 0, "llama_decode: the pool holds whole blocks");
  for (int64_t l = 0; l < L; ++l)
    for (const at::Tensor* cache : {&k_caches[l], &v_caches[l]})
      TORCH_CHECK(cache->sizes() == k0.sizes() && cache->scalar_type() == at::kFloat && cache->is_contiguous(),
                  "llama_decode: every K/V cache float32, contiguous, of one shape");
  for (const at::Tensor& w : norms)
    TORCH_CHECK(w.dim() == 1 && w.size(0) == Hd && w.scalar_type() == at::kFloat && w.is_contiguous(),
                "llama_decode: norm weights float32 [hidden]");
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == D && cos_sin.scalar_type() == at::kFloat &&
                  cos_sin.is_contiguous(), "llama_decode: cos_sin [positions, head_dim] float32");
  for (const at::Tensor* t : {&positions, &slot_mapping, &context_lens})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kLong && t->is_contiguous(),
                "llama_decode: positions, slot_mapping and context_lens int64 [B]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(), "llama_decode: block_tables int64 [B, max_blocks]");
  const int64_t qkv_width = (num_heads + 2 * num_kv_heads) * D, q_width = num_heads * D;
  std::vector<Linear> linears(4 * L);
  int64_t intermediate = 0, max_k = Hd;
  for (int64_t l = 0; l < L; ++l) {
    const auto linear = [&](int64_t i, int64_t K, const char* what) {
      const int64_t j = 4 * l + i;
      linears[j] = make_linear(qweights[j], scales[j], mins[j], group_sizes[j], K, l, what);
    };
    linear(0, Hd, "qkv_proj");
    TORCH_CHECK(linears[4 * l].N == qkv_width, "llama_decode: qkv_proj gives (H + 2 KVH) * D outputs");
    linear(1, q_width, "o_proj");
    TORCH_CHECK(linears[4 * l + 1].N == Hd, "llama_decode: o_proj gives hidden outputs");
    linear(2, Hd, "gate_up_proj");
    TORCH_CHECK(linears[4 * l + 2].N % 2 == 0 && (intermediate == 0 || linears[4 * l + 2].N / 2 == intermediate),
                "llama_decode: gate_up_proj gives 2 * intermediate outputs");
    intermediate = linears[4 * l + 2].N / 2;
    linear(3, intermediate, "down_proj");
    TORCH_CHECK(linears[4 * l + 3].N == Hd, "llama_decode: down_proj gives hidden outputs");
    max_k = std::max({max_k, q_width, intermediate});
  }
  // a wrong index would read or write outside the pool: check every one the step uses
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1), pool_blocks = slots / block_size;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_sin.size(0), "llama_decode: position ", pos[b], " outside the cache");
    TORCH_CHECK(slot[b] >= 0 && slot[b] < slots, "llama_decode: slot ", slot[b], " outside the pool");
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, "llama_decode: context length ", lens[b]);
    for (int64_t blk = 0; blk * block_size < lens[b]; ++blk) {
      const int64_t id = tables[b * max_blocks + blk];
      TORCH_CHECK(id >= 0 && id < pool_blocks, "llama_decode: block ", id, " outside the pool");
    }
  }

  const int64_t max_groups = (max_k + 31) / 32;
  std::vector<float> qkv(B * qkv_width), attn(B * q_width), proj(B * Hd), gate_up(B * 2 * intermediate);
  auto out = at::empty({B, Hd}, hidden.options());
  const float* cs = cos_sin.data_ptr<float>();
  const float* embeddings = hidden.data_ptr<float>();
  const int64_t group = num_heads / num_kv_heads, kv_width = num_kv_heads * D;
  const float scale = static_cast<float>(attn_scale), epsilon = static_cast<float>(eps);
  const bool int8 = int8_activations;
  SpinBarrier barrier;

  // Five barriers per layer, after each phase whose output every thread reads (q|k|v, attention, o, gate|up,
  // down). The small serial parts between them (norms, SiLU, rounding a linear's input) every thread computes
  // for itself, on its own copy of the residual stream: the same arithmetic on the same inputs gives every copy
  // the same bits, and nobody waits for one thread to do them.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    if (tid == 0) barrier.threads = nt;
#pragma omp barrier
    Scratch s;
    s.panel.resize(genserve_grouped::kPanel * max_k);
    s.ws.resize(genserve_int8::kRows * (max_k / 32));
    std::vector<float> residual(embeddings, embeddings + B * Hd), normed(B * Hd), act(B * intermediate),
        xsum(B * max_groups);
    std::vector<QuantizedRow> xq(B);
    int64_t begin, end;
    for (int64_t l = 0; l < L; ++l) {
      const Linear* lin = linears.data() + 4 * l;
      const float* input_norm = norms[2 * l].data_ptr<float>();
      const float* post_norm = norms[2 * l + 1].data_ptr<float>();
      float* k_cache = k_caches[l].data_ptr<float>();
      float* v_cache = v_caches[l].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {  // layer 0 normalises the embeddings; later ones add the MLP's output
        float* res = residual.data() + b * Hd;
        genserve_elementwise::rms_norm_row(l == 0 ? res : proj.data() + b * Hd, l == 0 ? nullptr : res, input_norm,
                                           normed.data() + b * Hd, Hd, epsilon);
      }
      prepare_input(lin[0], normed.data(), B, int8, xsum.data(), xq.data());
      run_linear(lin[0], normed.data(), xsum.data(), xq.data(), B, int8, qkv.data(), tid, nt, s);
      barrier.wait();
      // each (sequence, KV head) item: rotate its query heads and its key, store its K/V, attend
      share(B * num_kv_heads, tid, nt, begin, end);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
        float* row = qkv.data() + b * qkv_width;
        float* q = row + h * group * D;
        float* k = row + q_width + h * D;
        const float* cos = cs + pos[b] * D;
        rotate_heads(q, group, D, cos, cos + D / 2);
        rotate_heads(k, 1, D, cos, cos + D / 2);
        std::memcpy(k_cache + slot[b] * kv_width + h * D, k, D * sizeof(float));
        std::memcpy(v_cache + slot[b] * kv_width + h * D, row + q_width + kv_width + h * D, D * sizeof(float));
        attend(D, q, k_cache, v_cache, tables + b * max_blocks, lens[b], attn.data() + b * q_width + h * group * D,
               num_kv_heads, h, group, block_size, scale, s);
      }
      barrier.wait();
      prepare_input(lin[1], attn.data(), B, int8, xsum.data(), xq.data());
      run_linear(lin[1], attn.data(), xsum.data(), xq.data(), B, int8, proj.data(), tid, nt, s);
      barrier.wait();
      for (int64_t b = 0; b < B; ++b)
        genserve_elementwise::rms_norm_row(proj.data() + b * Hd, residual.data() + b * Hd, post_norm,
                                           normed.data() + b * Hd, Hd, epsilon);
      prepare_input(lin[2], normed.data(), B, int8, xsum.data(), xq.data());
      run_linear(lin[2], normed.data(), xsum.data(), xq.data(), B, int8, gate_up.data(), tid, nt, s);
      barrier.wait();
      for (int64_t b = 0; b < B; ++b) {
        const float* gate = gate_up.data() + b * 2 * intermediate;
        genserve_elementwise::silu_and_mul_row(gate, gate + intermediate, act.data() + b * intermediate,
                                               intermediate);
      }
      prepare_input(lin[3], act.data(), B, int8, xsum.data(), xq.data());
      run_linear(lin[3], act.data(), xsum.data(), xq.data(), B, int8, proj.data(), tid, nt, s);
      barrier.wait();
    }
    if (tid == 0) {
      const float* final_norm = norms[2 * L].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        genserve_elementwise::rms_norm_row(proj.data() + b * Hd, residual.data() + b * Hd, final_norm,
                                           out.data_ptr<float>() + b * Hd, Hd, epsilon);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve_cpu, m) {
  m.def("llama_decode(Tensor hidden, Tensor positions, Tensor[] norms, Tensor[] qweights, Tensor[] scales, "
        "Tensor[] mins, int[] group_sizes, Tensor[] k_caches, Tensor[] v_caches, Tensor cos_sin, "
        "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int block_size, int num_heads, "
        "int num_kv_heads, float attn_scale, float eps, bool int8_activations) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) { m.impl("llama_decode", &llama_decode); }
