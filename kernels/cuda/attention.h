// Softmax attention CUDA kernels with the CPU twin's contract
// (kernels/cpu/attention.h): GQA, causal mask by global i64 positions, the S2
// block mask, per-row log-sum-exp out and its gradient in. Storage bf16 or f32
// with fp32 math; lse and dlse are always f32 (statistics stay fp32). Two sets
// of kernels sit behind these entry points: the interim CUDA-core kernels
// (attention.cu; any D <= 128, f32 or bf16, fp32 math throughout) and the
// flash kernels (flash_attention.cu; tensor cores, bf16 and D = 64 or 128:
// P and dS are rounded to bf16 as mma operands, everything else in fp32).
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"
#include "kernels/cpu/attention.h"  // MaskForm

namespace loom::cuda {

// Which kernels an entry point runs. flash falls back to interim where the
// flash kernels do not apply (flash_attention_applies). cudnn runs cuDNN's
// fused attention (cudnn_attention.h) where it takes the call — dense (no S2),
// a diagonal mask (`form`, from the host positions), bf16, D 64 or 128,
// for the backward no lse gradient and lengths that are multiples of 128 —
// and flash elsewhere (also where cuDNN has no engine for the shape, which is
// reported once on stderr). best: cuDNN or flash, whichever ran the shape faster when
// both were timed on its first call (per direction; flash alone where cuDNN
// does not take the call or has no engine).
enum class AttentionKernel { interim, flash, cudnn, best };

// The flash backward is fused by default (dK, dV and, with atomics, dQ in one
// pass: faster, but dQ's rounding varies from run to run). Deterministic, it
// runs separate dQ and dK dV kernels without atomics (bitwise reproducible).
// Process-wide; the trainer sets it from train.deterministic.
void set_deterministic_attention(bool deterministic);
bool deterministic_attention();

// True when the flash kernels take these operands: bf16, D = 64 or 128, every
// pointer 16-byte aligned (and, for the backward, dout defined).
bool flash_attention_applies(const Tensor& q, const Tensor& k, const Tensor& v);

// q (B, T, H, D), k and v (B, S, Hkv, D), H % Hkv == 0, D <= 128; contiguous on
// the stream's device, one dtype (bf16 or f32). q_positions (T), k_positions
// (S): contiguous i64 on the device, needed when `causal` or S2 is on (key j
// visible to query i iff k_pos[j] <= q_pos[i], and for S2 the block pair is
// active in kv head hk's pattern). out (B, T, H, D) like q; lse (B, H, T) f32.
// A row with no visible key gets out = 0 and lse = -inf.
void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                       const S2Pattern& s2, Stream& s, AttentionKernel kernel = AttentionKernel::interim,
                       cpu::MaskForm form = {});

// dq, dk, dv (overwritten, like q, k, v) from dout (B, T, H, D, like q) and
// dlse (B, H, T, f32); either may be undefined (zero). Deterministic (no atomics).
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                        const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                        const S2Pattern& s2, Stream& s, AttentionKernel kernel = AttentionKernel::interim,
                       cpu::MaskForm form = {});

// Gated attention (cpu::OutputGate; the CPU twins in kernels/cpu/attention.h): out = o * gate.
// The flash kernels apply the gate where they write o (the fused epilogue); the other paths
// (cuDNN, the interim kernels) run the plain forward into `ungated` and the gate after it.
// `ungated` comes back holding o where the backward needs it (the gate has w, or the forward
// was not fused), else undefined. bf16 or f32 like q; z, w 16-byte aligned for the fused path.
void attention_forward_gated(Tensor& out, Tensor& ungated, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, const cpu::OutputGate& gate, const Tensor& q_positions,
                             const Tensor& k_positions, double scale, bool causal, const S2Pattern& s2, Stream& s,
                             AttentionKernel kernel = AttentionKernel::interim, cpu::MaskForm form = {});

// The gated backward: the pre-pass (dout = gate dy, dz, dw and, when `ungated` is undefined,
// delta from dy and y: then the flash backward runs on them; else the plain backward above
// on dout and o). dz, dw (like gate.z, gate.w) are written where the gate has them.
void attention_backward_gated(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dz, Tensor& dw, const Tensor& dy,
                              const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                              const Tensor& ungated, const Tensor& lse, const cpu::OutputGate& gate,
                              const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                              const S2Pattern& s2, Stream& s, AttentionKernel kernel = AttentionKernel::interim,
                              cpu::MaskForm form = {});

}  // namespace loom::cuda
