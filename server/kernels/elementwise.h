// One row of the fused elementwise ops of a decoder layer (elementwise_cpu.cpp), shared with llama_decode_cpu.cpp.
// Same math as the PyTorch path: float32 inside, rounded to the tensor's dtype where PyTorch rounds.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

namespace genserve_elementwise {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// silu(gate) * up over one row of `width`
template <typename scalar_t>
inline GENSERVE_SHARED void silu_and_mul_row(const scalar_t* gate, const scalar_t* up, scalar_t* o, int64_t width) {
  // PyTorch: silu(gate) rounded to the dtype, then times up, rounded again
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = to_float(gate[i]);
    const scalar_t act = static_cast<scalar_t>(g / (1.f + std::exp(-g)));
    o[i] = static_cast<scalar_t>(to_float(act) * to_float(up[i]));
  }
}

// o = weight * rmsnorm(x) over one row; with hr (the residual row), first hr += x and normalise that
template <typename scalar_t>
inline GENSERVE_SHARED void rms_norm_row(const scalar_t* xr, scalar_t* hr, const scalar_t* weight, scalar_t* o, int64_t width,
                         float eps) {
  float sum = 0.f;
  if (hr) {  // residual += x, rounded to the dtype as PyTorch's add_ does; the norm reads the sum
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) {
      const scalar_t h = static_cast<scalar_t>(to_float(hr[i]) + to_float(xr[i]));
      hr[i] = h;
      sum += to_float(h) * to_float(h);
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) sum += to_float(xr[i]) * to_float(xr[i]);
  }
  const scalar_t* src = hr ? hr : xr;
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
  // weight * normed.to(dtype): the normalised value is rounded before the weight multiplies it
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const scalar_t normed = static_cast<scalar_t>(to_float(src[i]) * inv);
    o[i] = static_cast<scalar_t>(to_float(weight[i]) * to_float(normed));
  }
}

// Greedy pick over one row of logits: picked[0] = the first maximum's id (torch.argmax's), picked[1] = its
// log-probability logit - lse in float32; returns lse (logsumexp). Defined once, in elementwise_cpu.cpp: greedy_pick
// and the fused greedy decode steps (llama_decode_cpu.cpp) run the one compiled copy (a copy per caller, even
// noinline, may be cloned and vectorized differently, and rounded differently).
float greedy_row(const float* row, int64_t vocab, double* picked);

}  // namespace genserve_elementwise
