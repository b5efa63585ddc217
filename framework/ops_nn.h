// Differentiable neural-network ops: normalization, activations, softmax,
// RoPE, reference softmax attention (with per-row log-sum-exp), cross-entropy.
// Each op is one autograd node; forward and backward kernels live side by side
// in kernels/cpu/<family>.cpp and are wrapped in framework/ops_nn*.cpp.
#pragma once

#include "framework/autograd.h"
#include "kernels/cpu/s2_pattern.h"

namespace loom {

// x (..., C), weight (C) -> (..., C): y = x * rsqrt(mean(x^2) + eps) * weight.
Variable rms_norm(const Variable& x, const Variable& weight, double eps);
Variable silu(const Variable& x);     // x * sigmoid(x)
Variable sigmoid(const Variable& x);
// gate, up (..., F) -> silu(gate) * up
Variable swiglu(const Variable& gate, const Variable& up);
// Sigmoid output gate x * sigmoid(z) as one node (ALGORITHMS.md §9). z has x's shape (element-wise
// gate) or x's shape without its last dim (one gate per last-dim row of x: a per-head gate
// (B, T, H) of (B, T, H, D)). Saves x and z, not sigmoid(z); the backward recomputes it.
Variable sigmoid_gate(const Variable& x, const Variable& z);
// softmax over `dim` (default: last)
Variable softmax(const Variable& x, int64_t dim = -1);

// Rotary position embedding, rotate-half pairing (channel i pairs with i + D/2,
// as in Hugging Face Llama): x (B, T, H, D), positions integer (T) or (B, T)
// giving each token's global position; inv_freq_i = theta^(-2i/D).
Variable rope(const Variable& x, const Tensor& positions, double theta);

struct AttentionOptions {
  bool causal = true;
  double scale = 0.0;  // 0: 1/sqrt(D)
  // Global positions of the query and key tokens (integer, (T) and (S)); when
  // undefined they are 0..T-1 and 0..S-1. Causal: key j is visible to query i
  // iff k_positions[j] <= q_positions[i].
  Tensor q_positions;
  Tensor k_positions;
  // S2 block sparsity (ALGORITHMS.md §7); s2.block = 0 (default) is dense.
  // Blocks are by global position (position / s2.block). Query head h uses the
  // pattern of its kv head h / (H / Hkv) among Hkv patterns (the heads of a GQA
  // group share K/V, so they share the key blocks to load). Needs causal and
  // non-negative positions. Masked-out keys contribute nothing, forward and backward.
  S2Pattern s2;
};
struct AttentionResult {
  Variable out;  // (B, T, H, D)
  Variable lse;  // (B, H, T): log-sum-exp of the scaled scores; -inf for rows with no visible key
};
// Reference softmax attention. q (B, T, H, D), k and v (B, S, Hkv, D) with
// H % Hkv == 0 (GQA: query head h uses kv head h / (H / Hkv)). Rows with no
// visible key give out = 0 and lse = -inf. Both outputs are differentiable.
AttentionResult attention(const Variable& q, const Variable& k, const Variable& v, const AttentionOptions& options);

// The output gate of gated attention and MoH (ALGORITHMS.md §8, §9), applied in the
// attention kernels' epilogue with its gradient in the backward pre-pass:
// out = o * sigmoid(z) * w, z (B, T, H) (headwise: one per token and head) or (B, T, H, D)
// (elementwise), w (B, T, H) (MoH's head weights); either undefined counts as 1. Same dtype
// as q. With the sigmoid gate alone the op keeps only its output for the backward (o is not
// saved: one (B, T, H, D) tensor less than attention followed by sigmoid_gate); with w it
// keeps o too (w may be 0, where out says nothing of o).
struct AttentionOutputGate {
  Variable z;
  Variable w;
};
// attention(q, k, v, options) with the gate applied to `out`; lse is the ungated one.
// q, k, v, z, w all differentiable.
AttentionResult gated_attention(const Variable& q, const Variable& k, const Variable& v,
                                const AttentionOutputGate& gate, const AttentionOptions& options);

enum class Reduction { mean, sum };
// logits (N, V), targets integer (N); targets equal to ignore_index contribute
// nothing. mean: sum of losses / number of non-ignored targets (0 when none).
// Targets outside [0, V) (other than ignore_index) are an error naming them.
Variable cross_entropy(const Variable& logits, const Tensor& targets, int64_t ignore_index = -100,
                       Reduction reduction = Reduction::mean);

}  // namespace loom
