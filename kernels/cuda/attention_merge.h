// CUDA twin of the exact partial-attention merge (kernels/cpu/attention_merge.h,
// ALGORITHMS.md §1), used by ring and all-gather attention on CUDA tensors.
// The running (out_acc, lse_acc) and part_lse are fp32 always, so partial
// results of bf16 attention are merged in fp32 and rounded once, by the
// caller, after the last block; part_out may be bf16 or f16 (the attention
// kernel's output dtype) or f32.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// Same contract as cpu::attention_merge: out_acc (B, N, H, D) f32, lse_acc
// (B, H, N) f32, part_out (B, n, H, D) f32/bf16/f16, part_lse (B, H, n) f32,
// rows [row_start, row_start + n) merged in place; all contiguous on the
// stream's device. One warp per (b, row, h); no atomics (deterministic).
void attention_merge(Tensor& out_acc, Tensor& lse_acc, const Tensor& part_out, const Tensor& part_lse,
                     int64_t row_start, Stream& s);

}  // namespace loom::cuda
