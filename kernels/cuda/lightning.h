// Lightning attention CUDA kernels with the CPU twin's contract
// (kernels/cpu/lightning.h, ALGORITHMS.md §4): causal linear attention with a
// per-head decay gamma_h = exp(-lambda_h), initial state in, final state out,
// dS_final in and dS_initial out (LASP-2 chains calls through them, §5).
// Storage bf16 or f32 with fp32 math; states and their gradients are f32.
// lightning.cu says how the work is split (tensor cores for bf16, CUDA cores
// for f32; the sequence cut into segments that run in parallel).
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// q, k, v, out (B, T, H, D), D <= 128, contiguous on the stream's device, one
// dtype (bf16 or f32). initial_state (B, H, D, D) f32 on the device, or
// undefined (zeros); final_state (B, H, D, D) f32 gets S after the last token
// (= S0 when T = 0). decay_lambdas (H): a CPU tensor of any floating dtype,
// finite and >= 0 (the mixer's fixed schedule; the powers gamma^m are formed in
// double on the host). block_size >= 0 is accepted for the CPU twin's
// signature; the kernel always works in chunks of 64 tokens (same math; the
// results agree to rounding with any block_size of the twin).
//
// saved_states, when given, gets what the backward can reuse: the state entering
// each segment the sequence was cut into, f32 (segments, B, H, D, D), or
// undefined when the call used one segment. Its size does not grow with T: the
// segment count is planned to fill the GPU about once (B H segments near a wave
// of blocks: 16 MiB for B 1, H 16, D 128 on an H100), at most 8 waves.
void lightning_forward(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                       int64_t block_size, Stream& s, Tensor* saved_states = nullptr);

// dq, dk, dv (B, T, H, D, like q; overwritten) and dinitial_state (B, H, D, D)
// f32 (overwritten unless undefined) from dout (like q) and dfinal_state
// (B, H, D, D, f32); either may be undefined (zero). The forward-order states
// come from saved_states (the forward's, same q, k, v, initial state and
// decays: the backward then cuts the sequence the same way and skips their
// recomputation, one pass over k and v) or, undefined, are recomputed.
void lightning_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                        const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                        int64_t block_size, Stream& s, const Tensor& saved_states = Tensor());

}  // namespace loom::cuda
