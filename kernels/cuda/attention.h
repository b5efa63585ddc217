// Softmax attention CUDA kernels with the CPU twin's contract
// (kernels/cpu/attention.h): GQA, causal mask by global i64 positions, the S2
// block mask, per-row log-sum-exp out and its gradient in. Storage bf16 or f32
// with fp32 math; lse and dlse are always f32 (statistics stay fp32). These are
// the interim CUDA-core kernels (attention.cu says how they are tiled); issue 7's
// fused tensor-core kernels replace them behind these signatures.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom {
struct S2Pattern;  // kernels/cpu/s2_pattern.h
}

namespace loom::cuda {

// q (B, T, H, D), k and v (B, S, Hkv, D), H % Hkv == 0, D <= 128; contiguous on
// the stream's device, one dtype (bf16 or f32). q_positions (T), k_positions
// (S): contiguous i64 on the device, needed when `causal` or S2 is on (key j
// visible to query i iff k_pos[j] <= q_pos[i], and for S2 the block pair is
// active in kv head hk's pattern). out (B, T, H, D) like q; lse (B, H, T) f32.
// A row with no visible key gets out = 0 and lse = -inf.
void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                       const S2Pattern& s2, Stream& s);

// dq, dk, dv (overwritten, like q, k, v) from dout (B, T, H, D, like q) and
// dlse (B, H, T, f32); either may be undefined (zero). Deterministic (no atomics).
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                        const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                        const S2Pattern& s2, Stream& s);

}  // namespace loom::cuda
