// Differentiable lightning attention (ALGORITHMS.md §4): causal linear
// attention with a per-head decay, as one autograd node with two outputs (the
// attention output and the final state), so that sequence-parallel callers
// (LASP-2) can feed a state in and back-propagate into it.
#pragma once

#include "framework/autograd.h"

namespace loom {

struct LightningResult {
  Variable out;          // (B, T, H, D)
  Variable final_state;  // (B, H, D, D): S after the last token (rows: key channels, columns: value channels)
};

// q, k, v (B, T, H, D), one dtype (f32 or f64); decay_lambdas (H): gamma_h =
// exp(-lambda_h), lambda_h finite and >= 0 (not differentiated);
// initial_state (B, H, D, D) in fp32 for 16-bit q (else q's dtype), or undefined (zeros);
// final_state likewise (states are statistics: fp32 on CUDA bf16). Per head:
//   S_t = gamma S_{t-1} + k_t^T v_t,  out_t = out_scale * q_t S_t,  S_{-1} = initial_state.
// block_size = 0 runs the recurrent reference, > 0 the blocked kernel with that
// block (any T). Gradients flow to q, k, v and initial_state, from both outputs.
// Inputs may be non-contiguous (copied). CUDA tensors are refused until the kernel exists.
LightningResult lightning_attention(const Variable& q, const Variable& k, const Variable& v,
                                    const Tensor& decay_lambdas, const Variable& initial_state, double out_scale,
                                    int64_t block_size);

}  // namespace loom
