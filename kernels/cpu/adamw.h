// Fused AdamW update on CPU: one pass over (master param, grad, exp_avg,
// exp_avg_sq[, compute copy]) per element, so each element is read and written
// once per step instead of once per arithmetic op. The kernel works on flat
// spans (all operands contiguous with the same numel; shapes are ignored), so a
// ZeRO-1 optimizer can hand it a slice of a flattened parameter space.
#pragma once

#include <cstdint>

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// Scalars of one AdamW step. `step` is the 1-based step number t used for bias
// correction; weight_decay is the decoupled decay for this span (0 = none).
struct AdamWScalars {
  double lr = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;
  int64_t step = 1;
};

// Per element, with g = grad and p = param (the master, f32 or f64):
//   p  -= lr * wd * p                      (decoupled weight decay)
//   m   = beta1 * m + (1 - beta1) * g
//   v   = beta2 * v + (1 - beta2) * g^2
//   p  -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   compute = p rounded to compute's dtype       (only when `compute` is defined)
// param, exp_avg, exp_avg_sq share one dtype (f32 or f64); grad is any floating
// dtype (converted to the master's); compute is bf16, f16 or f32 (or undefined).
// Arithmetic runs in the master's precision.
void adamw_step(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                const AdamWScalars& scalars, Stream& s);

}  // namespace loom::cpu
