// `S` mixer: causal softmax self-attention with MHA/GQA and RoPE.
// q_proj (H*D, C), k_proj and v_proj (Hkv*D, C), o_proj (C, H*D), no biases
// (Llama layout, so exported weights load in standard tools).
#pragma once

#include "models/decoder.h"

namespace loom {

class SoftmaxAttention : public Mixer {
 public:
  SoftmaxAttention(const DecoderConfig& config, int64_t layer);
  Variable forward(const Variable& x, SequenceContext& ctx) const override;
  double extra_forward_flops_per_token(int64_t context_length) const override;

 private:
  int64_t n_heads_, n_kv_heads_, head_dim_;
  double rope_theta_;
  std::shared_ptr<Linear> q_proj_, k_proj_, v_proj_, o_proj_;
};

}  // namespace loom
