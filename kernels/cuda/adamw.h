// Fused AdamW on CUDA with the CPU twin's contract (kernels/cpu/adamw.h):
// one pass per element reads the master param, grad and both moments and
// writes master, moments and the rounded compute copy (30 bytes per element
// for an fp32 master with an fp32 grad and a bf16 compute copy). The
// arithmetic is the CPU twin's, operation for operation, with every product,
// sum, quotient and square root rounded separately (no fused multiply-add),
// so an fp32 or f64 result equals the CPU's bit for bit.
//
// adamw_step_many updates many spans in one launch per (master, grad,
// compute) dtype combination and per kMaxSpans (96) spans (multi_tensor.cuh).
//
// CUDA dtypes: master param and moments f32 or f64; grad f32, bf16, f16 or
// f64; compute copy bf16, f16 or f32 (or undefined). Every tensor contiguous
// on the stream's device.
#pragma once

#include <vector>

#include "framework/stream.h"
#include "framework/tensor.h"
#include "kernels/cpu/adamw.h"  // AdamWScalars

namespace loom::cuda {

using cpu::AdamWScalars;

// One span; see kernels/cpu/adamw.h for the formulas.
void adamw_step(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                const AdamWScalars& scalars, Stream& s);

// One span of a multi-tensor step. The handles share storage with the
// caller's tensors (they are written through). `compute` may be undefined.
struct AdamWSpan {
  Tensor param, exp_avg, exp_avg_sq, compute, grad;
  double weight_decay = 0.0;  // this span's decoupled decay (0 = none)
};

// Every span updated with `scalars` (whose weight_decay is ignored: each span
// carries its own). All spans are checked before anything is launched.
void adamw_step_many(std::vector<AdamWSpan>& spans, const AdamWScalars& scalars, Stream& s);

}  // namespace loom::cuda
