// `S` mixer: causal softmax self-attention with MHA/GQA and RoPE, plus the
// options of model.S (ALGORITHMS.md §7-§9), which all compose in one layer:
//   gate: none | headwise | elementwise  sigmoid output gate (§9)
//   heads: dense | moh                   mixture-of-heads routing (§8)
//   sparsity: dense | s2                 per-head block-sparse context shards (§7)
// Gate and MoH are per-(token, head) scales of the attention output, applied
// before o_proj: y = W_O · concat_h(moh_h · σ(W_g x)_h ⊙ o_h).
// S2 patterns are per kv head (query heads of a GQA group share theirs, as they
// share K/V): Hkv distinct patterns, stride_offset = max(1, vert_stride / Hkv);
// construction warns on stderr when Hkv < vert_stride (shards miss blocks).
//
// Parameters (no biases, Llama layout for the dense part):
//   q_proj (H*D, C), k_proj and v_proj (Hkv*D, C), o_proj (C, H*D)
//   gate_proj           (H, C) headwise or (H*D, C) elementwise
//   router_proj         (E, C)    MoH: E = H - h_s routed heads
//   shared_router_proj  (h_s, C)  MoH, only when h_s > 1
//   mix_proj            (2, C)    MoH, only when h_s > 0 (with no shared head
//                                 there is nothing to mix: gate = g_r)
#pragma once

#include "kernels/cpu/s2_pattern.h"
#include "models/decoder.h"

namespace loom {

// Throws naming the values when model.S options are invalid for n_heads / n_kv_heads.
void validate_softmax_options(const SoftmaxOptions& options, int64_t n_heads, int64_t n_kv_heads);

// The attention op's S2 pattern for model.S (block = 0 when sparsity is dense).
S2Pattern s2_pattern(const SoftmaxOptions& options);

// The warning text when the S2 patterns (one per kv head) leave key blocks
// that no head attends beyond the local window; "" when they cover the context.
std::string s2_coverage_warning(const SoftmaxOptions& options, int64_t n_heads, int64_t n_kv_heads, int64_t layer);

class SoftmaxAttention : public Mixer {
 public:
  SoftmaxAttention(const DecoderConfig& config, int64_t layer);
  Variable forward(const Variable& x, SequenceContext& ctx) const override;
  double extra_forward_flops_per_token(int64_t context_length) const override;

 private:
  // MoH gate (B, T, H) from the block input x (B, T, C); adds the weighted
  // load-balance loss to ctx.aux_losses and the raw value and loads to ctx.stats.
  Variable moh_gate(const Variable& x, SequenceContext& ctx) const;

  int64_t layer_, n_heads_, n_kv_heads_, head_dim_;
  double rope_theta_;
  SoftmaxOptions options_;
  S2Pattern s2_;
  int64_t moh_layers_ = 0;  // MoH layers in the model: the aux loss is averaged over them
  std::shared_ptr<Linear> q_proj_, k_proj_, v_proj_, o_proj_;
  std::shared_ptr<Linear> gate_proj_, router_proj_, shared_router_proj_, mix_proj_;
};

}  // namespace loom
