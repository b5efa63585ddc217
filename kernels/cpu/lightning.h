// Lightning attention CPU kernels (ALGORITHMS.md §4): causal linear attention
// with a per-head scalar decay gamma_h = exp(-lambda_h), an initial state in
// and a final state out (LASP-2 chains calls through them, §5).
//
// Per (batch, head), with S the (D, D) state (rows index key channels, columns
// value channels):
//   S_t = gamma * S_{t-1} + k_t^T v_t,   o_t = out_scale * q_t S_t,   S_{-1} = S0.
// block_size = 0 runs that recurrence token by token (the oracle); block_size
// = Bk > 0 runs the blocked form (intra-block masked products plus one state
// read and one state update per block; a shorter tail block is handled). Both
// are the same math and agree to rounding.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// q, k, v, out (B, T, H, D) contiguous, one dtype (f32 or f64); initial_state
// (B, H, D, D) contiguous in that dtype, or undefined (zeros); final_state
// (B, H, D, D) written with S_{T-1} (= S0 when T = 0). decay_lambdas (H), any
// floating dtype, finite and >= 0 (0 = no decay). Sums run in the inputs'
// dtype (f32 state for f32, f64 for f64).
void lightning_forward(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                       int64_t block_size, Stream& s);

// Gradients from dout (B, T, H, D) and dfinal_state (B, H, D, D); either may be
// undefined (zero). States are recomputed from q, k, v and initial_state.
// dq, dk, dv (B, T, H, D) are overwritten; so is dinitial_state (B, H, D, D)
// = dL/dS0 unless it is undefined (then it is not written).
void lightning_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                        const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                        int64_t block_size, Stream& s);

}  // namespace loom::cpu
