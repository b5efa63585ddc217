// The `S` mixer on the reference attention op. Sequence-parallel variants
// (ring, all-gather) and fused kernels replace the attention call, not this
// layer's parameters or math.
#include "models/softmax_attention.h"

#include "framework/ops.h"

namespace loom {

SoftmaxAttention::SoftmaxAttention(const DecoderConfig& config, int64_t layer)
    : n_heads_(config.n_heads), n_kv_heads_(config.n_kv_heads), head_dim_(config.head_dim),
      rope_theta_(config.rope_theta) {
  (void)layer;
  int64_t c = config.d_model;
  InitSpec out_init;
  out_init.kind = InitSpec::Kind::scaled_normal;  // writes into the residual stream
  q_proj_ = register_module("q_proj", std::make_shared<Linear>(c, n_heads_ * head_dim_, false, InitSpec{}, config.dtype));
  k_proj_ = register_module("k_proj", std::make_shared<Linear>(c, n_kv_heads_ * head_dim_, false, InitSpec{}, config.dtype));
  v_proj_ = register_module("v_proj", std::make_shared<Linear>(c, n_kv_heads_ * head_dim_, false, InitSpec{}, config.dtype));
  o_proj_ = register_module("o_proj", std::make_shared<Linear>(n_heads_ * head_dim_, c, false, out_init, config.dtype));
}

Variable SoftmaxAttention::forward(const Variable& x, SequenceContext& ctx) const {
  int64_t b = x.size(0), t = x.size(1);
  LOOM_CHECK(ctx.positions.defined() && ctx.positions.numel() == t)
      << "attention: positions must hold one entry per token (" << t << "), got "
      << (ctx.positions.defined() ? shape_str(ctx.positions.shape()) : std::string("none"));
  Variable q = reshape(q_proj_->forward(x), {b, t, n_heads_, head_dim_});     // (B, T, H, D)
  Variable k = reshape(k_proj_->forward(x), {b, t, n_kv_heads_, head_dim_});  // (B, T, Hkv, D)
  Variable v = reshape(v_proj_->forward(x), {b, t, n_kv_heads_, head_dim_});  // (B, T, Hkv, D)
  q = rope(q, ctx.positions, rope_theta_);
  k = rope(k, ctx.positions, rope_theta_);
  AttentionOptions options;
  options.causal = true;
  options.q_positions = ctx.positions;
  options.k_positions = ctx.positions;
  AttentionResult attn = attention(q, k, v, options);                 // out (B, T, H, D)
  Variable merged = reshape(attn.out, {b, t, n_heads_ * head_dim_});  // (B, T, H*D)
  return o_proj_->forward(merged);                                    // (B, T, C)
}

double SoftmaxAttention::extra_forward_flops_per_token(int64_t context_length) const {
  // Causal: scores and weighted sum, 2 * 2 * T * D * H per token, halved by the mask.
  return 2.0 * static_cast<double>(context_length) * head_dim_ * n_heads_;
}

}  // namespace loom
