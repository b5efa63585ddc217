// Internal interface between the attention entry points (attention.cpp, C++20:
// Tensor checks, S2Pattern) and the kernels (attention.cu, compiled by nvcc as
// C++17, which cannot include s2_pattern.h's defaulted comparison). Plain
// pointers and sizes only; every pointer lives on the launching stream's device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "framework/dtype.h"
#include "framework/host_device.h"

namespace loom::cuda::detail {

struct AttentionDims {
  int64_t B, T, S, H, Hkv, D;
};

// Visibility of key j to query i of kv head hk (the CPU twin's rule):
// causal: k_pos[j] <= q_pos[i]; S2 (s2_block > 0): with I = q_pos / block and
// J = k_pos / block, J <= I and (I - J < s2_local or (J + hk * s2_offset) % s2_stride == 0),
// s2_offset = s2_stride_offset(vert_stride, Hkv) computed on the host.
struct AttentionMask {
  const int64_t* q_pos = nullptr;  // (T) or null when neither causal nor S2
  const int64_t* k_pos = nullptr;  // (S)
  bool causal = false;
  int64_t s2_block = 0, s2_local = 1, s2_stride = 1, s2_offset = 1;
};

// The output gate of gated attention and MoH (ALGORITHMS.md §8, §9), applied where the
// output is written: out = o * sigmoid(z) * w, with z one value per (token, head) row
// (z_per_row, headwise) or per output element (elementwise), w one per row; either may be
// null (factor 1). `ungated` (may be null) receives o as well. Every pointer is of q's dtype.
struct AttentionGate {
  const void* z = nullptr;  // (B, T, H) when z_per_row, else (B, T, H, D)
  const void* w = nullptr;  // (B, T, H)
  void* ungated = nullptr;  // (B, T, H, D)
  bool z_per_row = true;
  LOOM_HOST_DEVICE bool any() const { return z != nullptr || w != nullptr; }
};

// Largest head dim the kernels take (rows are padded to 32, 64 or 128 on chip).
constexpr int64_t kMaxAttentionHeadDim = 128;

// out (B, T, H, D) like q; lse (B, H, T) f32. dtype: f32 or bf16.
void launch_attention_forward(DType dtype, void* out, float* lse, const void* q, const void* k, const void* v,
                              const AttentionDims& n, const AttentionMask& mask, float scale, cudaStream_t stream);

// delta (B, H, T) = rowsum(dout * out) - dlse (dout, dlse may be null: zero).
void launch_attention_delta(DType dtype, float* delta, const void* dout, const void* out, const float* dlse,
                            const AttentionDims& n, cudaStream_t stream);

// dq, dk, dv like q, k, v; dout may be null (zero), dlse may be null (zero);
// delta is scratch of B * H * T floats.
void launch_attention_backward(DType dtype, void* dq, void* dk, void* dv, float* delta, const void* dout,
                               const float* dlse, const void* q, const void* k, const void* v, const void* out,
                               const float* lse, const AttentionDims& n, const AttentionMask& mask, float scale,
                               cudaStream_t stream);

// The gate outside a kernel (the paths without the fused epilogue): out = ungated * gate (out,
// ungated (B, T, H, D); gate.ungated is not read). dtype: f32 or bf16.
void launch_attention_gate_apply(DType dtype, void* out, const void* ungated, const AttentionGate& gate,
                                 const AttentionDims& n, cudaStream_t stream);
// The gated backward's pre-pass, a warp per (token, head) row, from dy (B, T, H, D), the gated
// output y and, when gate.w is set, the ungated o (gate.ungated, read):
//   dout = g dy with g = sigmoid(z) w;  dz = (1 - sigmoid(z)) * (dy y summed over the row, or
//   per element);  dw = sum over the row of dy * o * sigmoid(z);  delta (B, H, T) = sum over the
//   row of dy y - dlse.
// dz, dw, delta and dlse may each be null (not wanted / zero).
void launch_attention_gate_prepass(DType dtype, void* dout, void* dz, void* dw, float* delta, const void* dy,
                                   const void* y, const float* dlse, const AttentionGate& gate,
                                   const AttentionDims& n, cudaStream_t stream);

// ---- flash attention (flash_attention.cu): tensor-core kernels for bf16 and
// D = 64 or 128, same masks and outputs as the kernels above. Every pointer
// of q, k, v, out, dout, dq, dk, dv must be 16-byte aligned.
bool flash_attention_supports(DType dtype, int64_t D);
// i64 scratch elements the flash launches need (per-tile position bounds).
int64_t flash_attention_scratch(const AttentionDims& n);
// gate: the fused output gate (out = o * gate; none by default).
void launch_flash_attention_forward(void* out, float* lse, const void* q, const void* k, const void* v,
                                    int64_t* scratch, const AttentionDims& n, const AttentionMask& mask,
                                    float scale, cudaStream_t stream, const AttentionGate& gate = {});
// fp32 scratch elements of the fused backward's dQ accumulator: B * H * D times T rounded up to
// whole 64-row tiles (the warpgroup kernel accumulates dQ in tile order).
int64_t flash_dq_acc_elems(const AttentionDims& n);
// dout must not be null; delta is scratch of B * H * T floats, or, with out null, delta as
// launch_attention_gate_prepass computed it (the gated backward: dout is its g dy). dq_acc: scratch
// of flash_dq_acc_elems floats for the fused backward (dQ accumulated with
// atomics or bulk reductions, not bitwise reproducible), or null for the
// deterministic two-kernel one.
void launch_flash_attention_backward(void* dq, void* dk, void* dv, float* delta, int64_t* scratch, float* dq_acc,
                                     const void* dout, const float* dlse, const void* q, const void* k,
                                     const void* v, const void* out, const float* lse, const AttentionDims& n,
                                     const AttentionMask& mask, float scale, cudaStream_t stream);

}  // namespace loom::cuda::detail
