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

#include <algorithm>
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
#include "int8_panel.h"

namespace {

using genserve_int8::QuantizedRow;

// One grouped linear's operands (int4_linear's layout), checked once per call.
struct Linear : genserve_grouped::GroupedOperands {
  const void* q = nullptr;
  const void* scale = nullptr;
  const void* mins = nullptr;
};

Linear make_linear(const at::Tensor& q, const at::Tensor& s, const at::Tensor& m, int64_t G, int64_t K,
                   const std::string& name) {
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
  std::vector<uint8_t> int8_panel;
  std::vector<int64_t> rows;
};

// What the linear reads besides x: per-group sums (float activations, one row) or int8 rows; one thread.
void prepare_input(const Linear& L, const float* x, int64_t M, bool int8, float* xsum, QuantizedRow* xq) {
  if (int8) {
    const bool pair_order = L.four_bit && !genserve_int8::uses_panels(M);  // the row kernel's order
    for (int64_t m = 0; m < M; ++m) genserve_int8::quantize_row(x + m * L.K, L.K, L.G, pair_order, xq[m]);
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
#if GENSERVE_INT8_PANEL
    if (int8 && genserve_int8::uses_panels(M)) {
      share(genserve_int8::panels_of(L.N), tid, nt, begin, end);
      genserve_int8::q8_panel_tasks(xq, q, scale, mins, nullptr, out, M, L.N, L.K, L.G, begin, end,
                                    s.int8_panel.data());
      return;
    }
#endif
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

// The layer stack's operands, checked once per call.
struct Stack {
  int64_t L = 0, Hd = 0, D = 0, slots = 0, block_size = 0, num_heads = 0, num_kv_heads = 0, group = 0;
  int64_t qkv_width = 0, q_width = 0, kv_width = 0, intermediate = 0, max_k = 0, max_positions = 0;
  std::vector<Linear> linears;  // 4 per layer: qkv, o, gate_up, down
  std::vector<const float*> norms;  // 2 per layer + the final one
  std::vector<float*> k_caches, v_caches;
  const float* cos_sin = nullptr;
  float scale = 1.f, eps = 0.f;
  bool int8 = false;
};

Stack check_stack(int64_t Hd, at::TensorList norms, at::TensorList qweights, at::TensorList scales,
                  at::TensorList mins, c10::IntArrayRef group_sizes, at::TensorList k_caches,
                  at::TensorList v_caches, const at::Tensor& cos_sin, int64_t block_size, int64_t num_heads,
                  int64_t num_kv_heads, double attn_scale, double eps, bool int8_activations) {
  Stack st;
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L > 0 && v_caches.size() == k_caches.size() && norms.size() == static_cast<size_t>(2 * L + 1) &&
                  qweights.size() == static_cast<size_t>(4 * L) && scales.size() == qweights.size() &&
                  mins.size() == qweights.size() && group_sizes.size() == qweights.size(),
              "llama_decode: per layer 2 norms, 4 linears, a K and a V cache; plus the final norm");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "llama_decode: heads a multiple of KV heads");
  const at::Tensor& k0 = k_caches[0];
  TORCH_CHECK(k0.dim() == 3 && k0.size(1) == num_kv_heads, "llama_decode: caches [slots, KVH, D]");
  const int64_t D = k0.size(2), slots = k0.size(0);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "llama_decode: head_dim 64, 128 or 256");
  TORCH_CHECK(block_size > 0 && slots % block_size == 0, "llama_decode: the pool holds whole blocks");
  for (int64_t l = 0; l < L; ++l)
    for (const at::Tensor* cache : {&k_caches[l], &v_caches[l]}) {
      TORCH_CHECK(cache->sizes() == k0.sizes() && cache->scalar_type() == at::kFloat && cache->is_contiguous(),
                  "llama_decode: every K/V cache float32, contiguous, of one shape");
    }
  for (const at::Tensor& w : norms) {
    TORCH_CHECK(w.dim() == 1 && w.size(0) == Hd && w.scalar_type() == at::kFloat && w.is_contiguous(),
                "llama_decode: norm weights float32 [hidden]");
    st.norms.push_back(w.data_ptr<float>());
  }
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == D && cos_sin.scalar_type() == at::kFloat &&
                  cos_sin.is_contiguous(), "llama_decode: cos_sin [positions, head_dim] float32");
  st.L = L, st.Hd = Hd, st.D = D, st.slots = slots, st.block_size = block_size;
  st.num_heads = num_heads, st.num_kv_heads = num_kv_heads, st.group = num_heads / num_kv_heads;
  st.qkv_width = (num_heads + 2 * num_kv_heads) * D, st.q_width = num_heads * D, st.kv_width = num_kv_heads * D;
  st.max_positions = cos_sin.size(0), st.cos_sin = cos_sin.data_ptr<float>();
  st.scale = static_cast<float>(attn_scale), st.eps = static_cast<float>(eps), st.int8 = int8_activations;
  st.linears.resize(4 * L);
  st.max_k = Hd;
  for (int64_t l = 0; l < L; ++l) {
    const auto linear = [&](int64_t i, int64_t K, const char* what) {
      const int64_t j = 4 * l + i;
      st.linears[j] = make_linear(qweights[j], scales[j], mins[j], group_sizes[j], K,
                                  "llama_decode: layer " + std::to_string(l) + " " + what);
    };
    linear(0, Hd, "qkv_proj");
    TORCH_CHECK(st.linears[4 * l].N == st.qkv_width, "llama_decode: qkv_proj gives (H + 2 KVH) * D outputs");
    linear(1, st.q_width, "o_proj");
    TORCH_CHECK(st.linears[4 * l + 1].N == Hd, "llama_decode: o_proj gives hidden outputs");
    linear(2, Hd, "gate_up_proj");
    TORCH_CHECK(st.linears[4 * l + 2].N % 2 == 0 &&
                    (st.intermediate == 0 || st.linears[4 * l + 2].N / 2 == st.intermediate),
                "llama_decode: gate_up_proj gives 2 * intermediate outputs");
    st.intermediate = st.linears[4 * l + 2].N / 2;
    linear(3, st.intermediate, "down_proj");
    TORCH_CHECK(st.linears[4 * l + 3].N == Hd, "llama_decode: down_proj gives hidden outputs");
    st.max_k = std::max({st.max_k, st.q_width, st.intermediate});
  }
  for (int64_t l = 0; l < L; ++l) {
    st.k_caches.push_back(k_caches[l].data_ptr<float>());
    st.v_caches.push_back(v_caches[l].data_ptr<float>());
  }
  return st;
}

// The step's rows: positions / context_lens [B] of the first step, slot_mapping [B, steps] (each row's new K/V
// slot at each step), block_tables [B, max_blocks] covering every step. A wrong index would read or write outside
// the pool: every one the steps use is checked.
struct Rows {
  const int64_t *pos = nullptr, *slot = nullptr, *lens = nullptr, *tables = nullptr;
  int64_t B = 0, max_blocks = 0, steps = 1;
};

Rows check_rows(const Stack& st, const at::Tensor& positions, const at::Tensor& slot_mapping,
                const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t B, int64_t steps) {
  for (const at::Tensor* t : {&positions, &context_lens})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kLong && t->is_contiguous(),
                "llama_decode: positions and context_lens int64 [B]");
  TORCH_CHECK(slot_mapping.numel() == B * steps && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(), "llama_decode: slot_mapping int64 [B * steps]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(), "llama_decode: block_tables int64 [B, max_blocks]");
  Rows r;
  r.pos = positions.data_ptr<int64_t>(), r.slot = slot_mapping.data_ptr<int64_t>();
  r.lens = context_lens.data_ptr<int64_t>(), r.tables = block_tables.data_ptr<int64_t>();
  r.B = B, r.max_blocks = block_tables.size(1), r.steps = steps;
  const int64_t pool_blocks = st.slots / st.block_size;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t last_pos = r.pos[b] + steps - 1, last_len = r.lens[b] + steps - 1;
    TORCH_CHECK(r.pos[b] >= 0 && last_pos < st.max_positions, "llama_decode: position ", last_pos,
                " outside the cache");
    for (int64_t s = 0; s < steps; ++s)
      TORCH_CHECK(r.slot[b * steps + s] >= 0 && r.slot[b * steps + s] < st.slots, "llama_decode: slot ",
                  r.slot[b * steps + s], " outside the pool");
    TORCH_CHECK(r.lens[b] >= 1 && last_len <= r.max_blocks * st.block_size, "llama_decode: context length ",
                last_len);
    for (int64_t blk = 0; blk * st.block_size < last_len; ++blk) {
      const int64_t id = r.tables[b * r.max_blocks + blk];
      TORCH_CHECK(id >= 0 && id < pool_blocks, "llama_decode: block ", id, " outside the pool");
    }
  }
  return r;
}

// The phases' outputs, which every thread reads.
struct Shared {
  std::vector<float> qkv, attn, proj, gate_up;
  Shared(const Stack& st, int64_t B)
      : qkv(B * st.qkv_width), attn(B * st.q_width), proj(B * st.Hd), gate_up(B * 2 * st.intermediate) {}
};

// Each thread's buffers, and its own copy of the residual stream.
struct ThreadState {
  Scratch s;
  std::vector<float> residual, normed, act, xsum;
  std::vector<QuantizedRow> xq;
  ThreadState(const Stack& st, int64_t B)
      : residual(B * st.Hd), normed(B * st.Hd), act(B * st.intermediate), xsum(B * ((st.max_k + 31) / 32)), xq(B) {
    s.panel.resize(genserve_grouped::kPanel * st.max_k);
    s.ws.resize(genserve_int8::kRows * (st.max_k / 32));
#if GENSERVE_INT8_PANEL
    s.int8_panel.resize(genserve_int8::panel_buffer_bytes(st.max_k, st.max_k / 32));  // groups of 32 at the most
#endif
  }
};

// Step `step` of the rows through every layer. On entry ts.residual holds the embeddings of the step's tokens; on
// return sh.proj holds the last MLP's output, still to add to the residual (the final norm does).
//
// Five barriers per layer, after each phase whose output every thread reads (q|k|v, attention, o, gate|up, down).
// The small serial parts between them (norms, SiLU, rounding a linear's input) every thread computes for itself,
// on its own copy of the residual stream: the same arithmetic on the same inputs gives every copy the same bits,
// and nobody waits for one thread to do them.
void run_layers(const Stack& st, const Rows& r, int64_t step, Shared& sh, ThreadState& ts, int tid, int nt,
                SpinBarrier& barrier) {
  const int64_t B = r.B, Hd = st.Hd, D = st.D, group = st.group;
  const bool int8 = st.int8;
  Scratch& s = ts.s;
  int64_t begin, end;
  for (int64_t l = 0; l < st.L; ++l) {
    const Linear* lin = st.linears.data() + 4 * l;
    const float* input_norm = st.norms[2 * l];
    const float* post_norm = st.norms[2 * l + 1];
    float* k_cache = st.k_caches[l];
    float* v_cache = st.v_caches[l];
    for (int64_t b = 0; b < B; ++b) {  // layer 0 normalises the embeddings; later ones add the MLP's output
      float* res = ts.residual.data() + b * Hd;
      genserve_elementwise::rms_norm_row(l == 0 ? res : sh.proj.data() + b * Hd, l == 0 ? nullptr : res,
                                         input_norm, ts.normed.data() + b * Hd, Hd, st.eps);
    }
    prepare_input(lin[0], ts.normed.data(), B, int8, ts.xsum.data(), ts.xq.data());
    run_linear(lin[0], ts.normed.data(), ts.xsum.data(), ts.xq.data(), B, int8, sh.qkv.data(), tid, nt, s);
    barrier.wait();
    // each (sequence, KV head) item: rotate its query heads and its key, store its K/V, attend
    share(B * st.num_kv_heads, tid, nt, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / st.num_kv_heads, h = item % st.num_kv_heads;
      const int64_t slot = r.slot[b * r.steps + step];
      float* row = sh.qkv.data() + b * st.qkv_width;
      float* q = row + h * group * D;
      float* k = row + st.q_width + h * D;
      const float* cos = st.cos_sin + (r.pos[b] + step) * D;
      rotate_heads(q, group, D, cos, cos + D / 2);
      rotate_heads(k, 1, D, cos, cos + D / 2);
      std::memcpy(k_cache + slot * st.kv_width + h * D, k, D * sizeof(float));
      std::memcpy(v_cache + slot * st.kv_width + h * D, row + st.q_width + st.kv_width + h * D, D * sizeof(float));
      attend(D, q, k_cache, v_cache, r.tables + b * r.max_blocks, r.lens[b] + step,
             sh.attn.data() + b * st.q_width + h * group * D, st.num_kv_heads, h, group, st.block_size, st.scale, s);
    }
    barrier.wait();
    prepare_input(lin[1], sh.attn.data(), B, int8, ts.xsum.data(), ts.xq.data());
    run_linear(lin[1], sh.attn.data(), ts.xsum.data(), ts.xq.data(), B, int8, sh.proj.data(), tid, nt, s);
    barrier.wait();
    for (int64_t b = 0; b < B; ++b)
      genserve_elementwise::rms_norm_row(sh.proj.data() + b * Hd, ts.residual.data() + b * Hd, post_norm,
                                         ts.normed.data() + b * Hd, Hd, st.eps);
    prepare_input(lin[2], ts.normed.data(), B, int8, ts.xsum.data(), ts.xq.data());
    run_linear(lin[2], ts.normed.data(), ts.xsum.data(), ts.xq.data(), B, int8, sh.gate_up.data(), tid, nt, s);
    barrier.wait();
    for (int64_t b = 0; b < B; ++b) {
      const float* gate = sh.gate_up.data() + b * 2 * st.intermediate;
      genserve_elementwise::silu_and_mul_row(gate, gate + st.intermediate, ts.act.data() + b * st.intermediate,
                                             st.intermediate);
    }
    prepare_input(lin[3], ts.act.data(), B, int8, ts.xsum.data(), ts.xq.data());
    run_linear(lin[3], ts.act.data(), ts.xsum.data(), ts.xq.data(), B, int8, sh.proj.data(), tid, nt, s);
    barrier.wait();
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
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kFloat && hidden.is_contiguous(),
              "llama_decode: hidden [B, hidden] float32");
  const int64_t B = hidden.size(0), Hd = hidden.size(1);
  const Stack st = check_stack(Hd, norms, qweights, scales, mins, group_sizes, k_caches, v_caches, cos_sin,
                               block_size, num_heads, num_kv_heads, attn_scale, eps, int8_activations);
  const Rows rows = check_rows(st, positions, slot_mapping, block_tables, context_lens, B, 1);
  Shared sh(st, B);
  auto out = at::empty({B, Hd}, hidden.options());
  const float* embeddings = hidden.data_ptr<float>();
  SpinBarrier barrier;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    if (tid == 0) barrier.threads = nt;
#pragma omp barrier
    ThreadState ts(st, B);
    std::copy(embeddings, embeddings + B * Hd, ts.residual.begin());
    run_layers(st, rows, 0, sh, ts, tid, nt, barrier);
    if (tid == 0) {
      for (int64_t b = 0; b < B; ++b)
        genserve_elementwise::rms_norm_row(sh.proj.data() + b * Hd, ts.residual.data() + b * Hd, st.norms[2 * st.L],
                                           out.data_ptr<float>() + b * Hd, Hd, st.eps);
    }
  }
  return out;
}

// Greedy decoding of `steps` tokens per row in one call: each step embeds the rows' tokens (rows of the grouped
// embedding, dequantized as VocabParallelEmbedding.rows does), runs the layer stack, the final norm, the grouped
// LM head (as ParallelLMHead with the same kernel) and the greedy pick (the sampler's, greedy_row), and feeds the
// picked tokens to the next step. The same arithmetic as the op-by-op steps, so the same tokens and
// log-probabilities to the bit (tests/server/test_llama_decode.py).
//
// Why: a step of one stream is ~8.5 ms of native work and ~1 ms of Python around it (scheduling, the LM head's and
// the sampler's dispatch, the step's bookkeeping), and over HTTP the server's event loop takes its share of the two
// cores per step too. Steps run back to back here pay that once (vLLM's multi-step scheduling), and even one step
// saves the LM head's own parallel region.
//
// token_ids: [B] each row's last token; positions / context_lens: [B] of the first step; slot_mapping: [B * steps]
// row-major (row b's slot at step s is b * steps + s); block_tables [B, max_blocks] cover all steps; embed_* /
// head_*: the grouped embedding [V', hidden] and LM head [V, hidden] (V <= V'); the rest as llama_decode.
// -> [B * steps, 2] float64 (picked id, its log-probability), row-major as slot_mapping.
at::Tensor llama_decode_greedy(const at::Tensor& token_ids, const at::Tensor& positions, int64_t steps,
                               const at::Tensor& embed_q, const at::Tensor& embed_scale, const at::Tensor& embed_min,
                               int64_t embed_group, const at::Tensor& head_q, const at::Tensor& head_scale,
                               const at::Tensor& head_min, int64_t head_group, bool head_int8, at::TensorList norms,
                               at::TensorList qweights, at::TensorList scales, at::TensorList mins,
                               c10::IntArrayRef group_sizes, at::TensorList k_caches, at::TensorList v_caches,
                               const at::Tensor& cos_sin, const at::Tensor& slot_mapping,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                               int64_t num_heads, int64_t num_kv_heads, double attn_scale, double eps,
                               bool int8_activations) {
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.scalar_type() == at::kLong && token_ids.is_contiguous(),
              "llama_decode_greedy: token_ids int64 [B]");
  TORCH_CHECK(steps >= 1, "llama_decode_greedy: at least one step");
  const int64_t B = token_ids.size(0);
  TORCH_CHECK(norms.size() > 0 && norms[0].dim() == 1, "llama_decode_greedy: norm weights [hidden]");
  const int64_t Hd = norms[0].size(0);
  const Stack st = check_stack(Hd, norms, qweights, scales, mins, group_sizes, k_caches, v_caches, cos_sin,
                               block_size, num_heads, num_kv_heads, attn_scale, eps, int8_activations);
  const Rows rows = check_rows(st, positions, slot_mapping, block_tables, context_lens, B, steps);
  const Linear embed = make_linear(embed_q, embed_scale, embed_min, embed_group, Hd, "llama_decode_greedy: embedding");
  const Linear head = make_linear(head_q, head_scale, head_min, head_group, Hd, "llama_decode_greedy: lm_head");
  TORCH_CHECK(head.N <= embed.N && head.N % 4 == 0, "llama_decode_greedy: an LM head of V <= V' rows, V % 4 == 0");
  const int64_t V = head.N;
  std::vector<int64_t> tokens(token_ids.data_ptr<int64_t>(), token_ids.data_ptr<int64_t>() + B);
  for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < V, "llama_decode_greedy: token id ", t, " outside the vocabulary");
  Shared sh(st, B);
  std::vector<float> logit_rows(B * V);
  float* logits = logit_rows.data();
  auto out = at::empty({B * steps, 2}, token_ids.options().dtype(at::kDouble));
  double* picked = out.data_ptr<double>();
  SpinBarrier barrier;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    if (tid == 0) barrier.threads = nt;
#pragma omp barrier
    ThreadState ts(st, B);
    int64_t begin, end;
    for (int64_t step = 0; step < steps; ++step) {
      for (int64_t b = 0; b < B; ++b)
        with_types(embed, [&](const auto* q, const auto* scale, const auto* mins) {
          const int64_t bytes = embed.four_bit ? Hd / 2 : Hd, groups = (Hd + embed.G - 1) / embed.G;
          genserve_grouped::dequantize_row(q + tokens[b] * bytes, scale + tokens[b] * groups,
                                           mins + tokens[b] * groups, Hd, embed.G, ts.residual.data() + b * Hd);
        });
      run_layers(st, rows, step, sh, ts, tid, nt, barrier);
      for (int64_t b = 0; b < B; ++b)
        genserve_elementwise::rms_norm_row(sh.proj.data() + b * Hd, ts.residual.data() + b * Hd, st.norms[2 * st.L],
                                           ts.normed.data() + b * Hd, Hd, st.eps);
      prepare_input(head, ts.normed.data(), B, head_int8, ts.xsum.data(), ts.xq.data());
      run_linear(head, ts.normed.data(), ts.xsum.data(), ts.xq.data(), B, head_int8, logits, tid, nt, ts.s);
      barrier.wait();
      share(B, tid, nt, begin, end);
      for (int64_t b = begin; b < end; ++b) {
        double* row = picked + 2 * (b * steps + step);
        genserve_elementwise::greedy_row(logits + b * V, V, row);
        tokens[b] = static_cast<int64_t>(row[0]);
      }
      barrier.wait();  // every thread embeds the new tokens next
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
  m.def("llama_decode_greedy(Tensor token_ids, Tensor positions, int steps, Tensor embed_q, Tensor embed_scale, "
        "Tensor embed_min, int embed_group, Tensor head_q, Tensor head_scale, Tensor head_min, int head_group, "
        "bool head_int8, Tensor[] norms, Tensor[] qweights, Tensor[] scales, Tensor[] mins, int[] group_sizes, "
        "Tensor[] k_caches, Tensor[] v_caches, Tensor cos_sin, Tensor slot_mapping, Tensor block_tables, "
        "Tensor context_lens, int block_size, int num_heads, int num_kv_heads, float attn_scale, float eps, "
        "bool int8_activations) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) {
  m.impl("llama_decode", &llama_decode);
  m.impl("llama_decode_greedy", &llama_decode_greedy);
}
