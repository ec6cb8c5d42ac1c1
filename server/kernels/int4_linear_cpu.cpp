// y = x @ W^T (+ bias) with W kept as 4-bit (or 8-bit) integers in groups: w[n, k] = q[n, k] * scale[n, g] + min[n, g],
// g = k / group_size. The layout GPTQ, AWQ and GGUF Q4_0 / Q4_1 share once their packing is undone
// (a zero point z is min = -z * scale; Q4_0 is z = 8).
//
// Packed weight [N, K / 2] uint8, per output row blocks of 32 values in 16 bytes: byte j holds value j in
// its low nibble and value j + 16 in its high nibble (GGUF's own block order, so its blocks copy as they are).
//
// Decode steps read every weight once per token, so they run at the memory's speed: 4 bits per weight
// instead of 32 is what counts. Nibbles are widened to float32 in registers and never written back; per
// group, sum(x * q) is scaled once and the min term is min * sum(x), so the inner loop is one FMA per weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "grouped_dot.h"
#include "grouped_operands.h"

namespace {

using namespace genserve_grouped;

template <typename weight_t, typename scale_t, typename out_t>
void grouped_rows(const float* x, const float* xsum, const weight_t* qw, const scale_t* scale, const scale_t* mins,
                  const float* bias, out_t* out, int64_t N, int64_t K, int64_t G) {
  at::parallel_for(0, N / kRowsPerTask, 8, [&](int64_t begin, int64_t end) {
    grouped_row_tasks(x, xsum, qw, scale, mins, bias, out, N, K, G, begin, end);
  });
}

template <typename weight_t, typename scale_t, typename out_t>
void grouped_panels(const float* x, const weight_t* qw, const scale_t* scale, const scale_t* mins, const float* bias,
                    out_t* out, int64_t M, int64_t N, int64_t K, int64_t G) {
  at::parallel_for(0, panels_of(N), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kPanel * K);
    grouped_panel_tasks(x, qw, scale, mins, bias, out, M, N, K, G, begin, end, panel.data());
  });
}

// x: [M, K] float32 or bfloat16; qweight: [N, K / 2] uint8 (4-bit, layout above) or [N, K] int8 (8-bit);
// scale, min: [N, ceil(K / G)] float32 or float16 (both the same); bias: [N] -> [M, N] in x's dtype.
// K % 32 == 0, G % 32 == 0, N % 4 == 0.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const at::Tensor& mins, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: x [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_linear: x float32 or bfloat16");
  const auto op = check_grouped_operands(qweight, scale, mins, x.size(1), group_size, "int4_linear");
  const bool is_4bit = op.four_bit;
  const int64_t M = x.size(0), N = op.N, K = op.K, G = op.G, num_groups = (K + G - 1) / G;
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto xf = x.to(at::kFloat).contiguous();
  // per activation row and group: sum of x, for the min term (one row; batches dequantize panels instead)
  at::Tensor xsum;
  if (M < kPanelMinRows) {
    xsum = at::empty({M, num_groups}, xf.options());
    group_sums(xf.data_ptr<float>(), M, K, G, xsum.data_ptr<float>());
  }
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias: one per output row");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  const float* xsp = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
  auto by_scale = [&](const auto* q, auto* o) {
    if (M >= kPanelMinRows) {
      if (s.scalar_type() == at::kFloat)
        grouped_panels(xp, q, s.data_ptr<float>(), mn.data_ptr<float>(), b, o, M, N, K, G);
      else
        grouped_panels(xp, q, s.data_ptr<c10::Half>(), mn.data_ptr<c10::Half>(), b, o, M, N, K, G);
    } else if (s.scalar_type() == at::kFloat) {
      grouped_rows(xp, xsp, q, s.data_ptr<float>(), mn.data_ptr<float>(), b, o, N, K, G);
    } else {
      grouped_rows(xp, xsp, q, s.data_ptr<c10::Half>(), mn.data_ptr<c10::Half>(), b, o, N, K, G);
    }
  };
  auto dispatch = [&](auto* o) {
    if (is_4bit) by_scale(qw.data_ptr<uint8_t>(), o);
    else by_scale(qw.data_ptr<int8_t>(), o);
  };
  if (x.scalar_type() == at::kFloat) dispatch(out.data_ptr<float>());
  else dispatch(out.data_ptr<c10::BFloat16>());
  return out;
}

// The float32 weight [N, K] of qweight / scale / min (long prefills hand it to the dense GEMM): the panels'
// dequantization over all rows, threads splitting them. ~40x faster than the same arithmetic in PyTorch ops.
at::Tensor grouped_dequantize(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& mins,
                              int64_t group_size) {
  TORCH_CHECK(qweight.dim() == 2, "qweight [N, K / 2] uint8 or [N, K] int8");
  const bool is_4bit = qweight.scalar_type() == at::kByte;
  TORCH_CHECK(is_4bit || qweight.scalar_type() == at::kChar, "qweight: uint8 (4-bit pairs) or int8");
  const int64_t N = qweight.size(0), K = qweight.size(1) * (is_4bit ? 2 : 1), G = group_size;
  TORCH_CHECK(K % kBlock == 0 && G % kBlock == 0 && G > 0, "K and the group size must be multiples of 32");
  const int64_t num_groups = (K + G - 1) / G;
  TORCH_CHECK(scale.sizes() == mins.sizes() && scale.size(0) == N && scale.size(1) == num_groups &&
                  scale.scalar_type() == mins.scalar_type() &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
              "scale and min: [N, ceil(K / group_size)], both float32 or both float16");
  auto qw = qweight.contiguous();
  auto s = scale.contiguous();
  auto mn = mins.contiguous();
  auto out = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  auto rows = [&](const auto* q, const auto* sc, const auto* mi) {
    const int64_t bytes = is_4bit ? K / 2 : K;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        dequantize_row(q + n * bytes, sc + n * num_groups, mi + n * num_groups, K, G, o + n * K);
    });
  };
  auto by_scale = [&](const auto* q) {
    if (s.scalar_type() == at::kFloat) rows(q, s.data_ptr<float>(), mn.data_ptr<float>());
    else rows(q, s.data_ptr<c10::Half>(), mn.data_ptr<c10::Half>());
  };
  if (is_4bit) by_scale(qw.data_ptr<uint8_t>());
  else by_scale(qw.data_ptr<int8_t>());
  return out;
}

void set_prefetch_distance(int64_t tasks) {
  TORCH_CHECK(tasks >= 1 && tasks <= 16, "set_prefetch_distance: 1 to 16 tasks ahead");
  prefetch_distance() = tasks;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor mins, int group_size, Tensor? bias) -> Tensor");
  m.def("grouped_dequantize(Tensor qweight, Tensor scale, Tensor mins, int group_size) -> Tensor");
  // the one-row kernels' weight prefetch distance, process-wide (no tensor: one catch-all kernel)
  m.def("set_prefetch_distance(int tasks) -> ()", &set_prefetch_distance);
}

TORCH_LIBRARY_IMPL(genserve_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("grouped_dequantize", &grouped_dequantize);
}
