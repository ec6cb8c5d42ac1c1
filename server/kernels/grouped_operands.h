// The operand contract of the grouped 4/8-bit matmuls (grouped_dot.h's layout), checked in one place for every op
// that takes them (int4_linear, int4_linear_int8_activations, each linear of llama_decode):
// qweight [N, K / 2] uint8 (4-bit pairs) or [N, K] int8; scale and min [N, ceil(K / G)], both float32 or both
// float16; K and the group size G multiples of 32, N of 4.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace genserve_grouped {

struct GroupedOperands {
  bool four_bit = true;
  bool half_scales = false;
  int64_t N = 0, K = 0, G = 0;
};

// `what` starts each message: the op's name, or the layer and linear of a fused step
inline GroupedOperands check_grouped_operands(const at::Tensor& qweight, const at::Tensor& scale,
                                              const at::Tensor& mins, int64_t K, int64_t G, const std::string& what) {
  GroupedOperands op;
  TORCH_CHECK(qweight.dim() == 2, what, ": qweight [N, K / 2] uint8 or [N, K] int8");
  op.four_bit = qweight.scalar_type() == at::kByte;
  TORCH_CHECK(op.four_bit || qweight.scalar_type() == at::kChar, what, ": qweight uint8 (4-bit pairs) or int8");
  op.N = qweight.size(0);
  op.K = K;
  op.G = G;
  TORCH_CHECK(qweight.size(1) * (op.four_bit ? 2 : 1) == K, what,
              ": qweight holds K / 2 (4-bit) or K (8-bit) bytes per row, for ", K, " input features");
  TORCH_CHECK(K % 32 == 0 && G % 32 == 0 && G > 0 && op.N % 4 == 0, what,
              ": K and the group size must be multiples of 32, N of 4");
  const int64_t groups = (K + G - 1) / G;
  TORCH_CHECK(scale.dim() == 2 && scale.sizes() == mins.sizes() && scale.size(0) == op.N && scale.size(1) == groups &&
                  scale.scalar_type() == mins.scalar_type() &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
              what, ": scale and min [N, ceil(K / group_size)], both float32 or both float16");
  op.half_scales = scale.scalar_type() == at::kHalf;
  return op;
}

// bias [N] as float32 (undefined when there is none), for kernels that add it to float32 sums
inline at::Tensor float_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->numel() == N, "bias: one per output row");
  return bias->to(at::kFloat).contiguous();
}

// run(qweight, scale, min) with the typed pointers of these (contiguous) operands: uint8 or int8 weights, float32
// or float16 scales and mins
template <typename Run>
void with_typed_operands(const GroupedOperands& op, const at::Tensor& qweight, const at::Tensor& scale,
                         const at::Tensor& mins, Run&& run) {
  auto by_scale = [&](const auto* q) {
    if (op.half_scales) run(q, scale.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>());
    else run(q, scale.data_ptr<float>(), mins.data_ptr<float>());
  };
  if (op.four_bit) by_scale(qweight.data_ptr<uint8_t>());
  else by_scale(qweight.data_ptr<int8_t>());
}

}  // namespace genserve_grouped
