// y = x @ W^T (+ bias) for grouped 4-bit / 8-bit weights (int4_linear_cpu.cpp's layout) with the activations
// quantized to int8 first, in blocks of 32 with one float scale each (GGUF's Q8_0, what llama.cpp does).
//
// Why: widening every weight to float32 costs ~16 instructions per 32 weights per row; an integer dot product
// of bytes (AVX2 maddubs, or VNNI's dpbusd) does the same 32 products in ~6, so a single stream stops being
// bound by the widening. The price is one rounding of each activation to 8 bits (relative error <= 1/254 of
// its block's largest value): outputs are close to, not equal to, the float kernel's. Hence opt-in
// (--activation-quantization int8); the float kernel stays the default.
//
// Block arithmetic, per output row n and 32-value block b of activation row m:
//   sum_k x[k] * w[k] = dx[b] * scale[n, g] * sum_k xq[k] * q[k]   (+ min[n, g] * sum_k x[k], added per group,
// with the exact float sum of x). 4-bit q is 0..15 (unsigned); 8-bit q is signed: |q| and q's sign moved onto xq.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "grouped_operands.h"
#include "int8_dot.h"
#include "int8_panel.h"

namespace {

using namespace genserve_int8;
using genserve_grouped::check_grouped_operands;

template <typename weight_t, typename scale_t, typename out_t>
void q8_activation_linear(const std::vector<QuantizedRow>& xs, const weight_t* qw, const scale_t* scale,
                          const scale_t* mins, const float* bias, out_t* out, int64_t M, int64_t N, int64_t K,
                          int64_t G) {
#if GENSERVE_INT8_PANEL
  if (uses_panels(M)) {
    const int64_t bytes = panel_buffer_bytes(K, (K + G - 1) / G);
    at::parallel_for(0, panels_of(N), 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> buffer(bytes);
      q8_panel_tasks(xs.data(), qw, scale, mins, bias, out, M, N, K, G, begin, end, buffer.data());
    });
    return;
  }
#endif
  at::parallel_for(0, N / kRows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> ws_buffer(kRows * (K / kBlock));
    q8_tasks(xs.data(), qw, scale, mins, bias, out, M, N, K, G, begin, end, ws_buffer.data());
  });
}

// int4_linear's contract (x [M, K] float32/bfloat16; qweight [N, K / 2] uint8 or [N, K] int8; scale, min
// [N, ceil(K / G)] float32 or float16; K % 32 == 0, G % 32 == 0, N % 4 == 0), activations rounded to int8.
at::Tensor int4_linear_int8_activations(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                        const at::Tensor& mins, int64_t group_size,
                                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "int4_linear_int8_activations: x [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int4_linear_int8_activations: x float32 or bfloat16");
  const auto op = check_grouped_operands(qweight, scale, mins, x.size(1), group_size, "int4_linear_int8_activations");
  const bool is_4bit = op.four_bit;
  const int64_t M = x.size(0), N = op.N, K = op.K, G = op.G;
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto xf = x.to(at::kFloat).contiguous();
  std::vector<QuantizedRow> xs(M);
  const bool pair_order = is_4bit && !uses_panels(M);  // the row kernel's order; the panels read x as it is
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row(xf.data_ptr<float>() + m * K, K, G, pair_order, xs[m]);
  });
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias: one per output row");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, x.options());
  auto run = [&](const auto* q, auto* o) {
    if (s.scalar_type() == at::kFloat)
      q8_activation_linear(xs, q, s.data_ptr<float>(), mn.data_ptr<float>(), b, o, M, N, K, G);
    else
      q8_activation_linear(xs, q, s.data_ptr<c10::Half>(), mn.data_ptr<c10::Half>(), b, o, M, N, K, G);
  };
  auto by_weight = [&](auto* o) {
    if (is_4bit) run(qw.data_ptr<uint8_t>(), o);
    else run(qw.data_ptr<int8_t>(), o);
  };
  if (x.scalar_type() == at::kFloat) by_weight(out.data_ptr<float>());
  else by_weight(out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve_cpu, m) {
  m.def("int4_linear_int8_activations(Tensor x, Tensor qweight, Tensor scale, Tensor mins, int group_size, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) { m.impl("int4_linear_int8_activations", &int4_linear_int8_activations); }
