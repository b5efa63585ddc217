// `L` mixer: lightning attention (causal linear attention with a per-head
// decay, ALGORITHMS.md §4), TransNormer/Lightning-style, no positions (no RoPE).
//
//   q = act(q_proj(x)), k = act(k_proj(x)), v = v_proj(x)        (B, T, H, D); act = silu | none
//   o = lightning_attention(q, k, v, lambdas, s_o = 1/sqrt(D), block = model.L.block)
//   o = out_norm(o)               when model.L.output_norm: RMS statistics per head over
//                                 its D channels, gain per channel (H*D)
//   o = o * sigmoid(gate_proj(x))  when model.L.output_gate
//   y = o_proj(o)                                                  (B, T, C)
//
// Decay of head h in layer l of L (TransNormer schedule; head 0 never decays,
// decay_scale = 0 turns decay off everywhere; rates are fixed, not learned):
//   lambda_h = decay_scale * h / H * (1 - l / L),  gamma_h = exp(-lambda_h).
// Output scale s_o = 1/sqrt(D): with output_norm it cancels (RMSNorm is
// scale-invariant up to eps); without it, it keeps q.k at the magnitude softmax
// attention uses (and is flash-linear-attention's default scale).
// Per-head normalization: heads sum over very different spans (head 0 over all
// tokens, decayed heads over ~1/lambda_h), so a norm over H*D would be
// dominated by the undecayed heads; per head each is brought to unit RMS.
//
// Parameters (stable names, under blocks.{i}.mixer.):
//   q_proj.weight, k_proj.weight, v_proj.weight   (H*D, C)
//   gate_proj.weight                              (H*D, C), only with output_gate
//   out_norm.weight                               (H*D), only with output_norm (init ones, no decay)
//   o_proj.weight                                 (C, H*D), scaled_normal init
#pragma once

#include "models/decoder.h"

namespace loom {

// RMSNorm with statistics per head: x (..., H, D) -> same shape, each head's D
// channels normalized, then multiplied by a per-channel gain (H*D).
class HeadRMSNorm : public Module {
 public:
  HeadRMSNorm(int64_t heads, int64_t head_dim, double eps, DType dtype);
  Variable forward(const Variable& x) const;

 private:
  int64_t heads_, head_dim_;
  double eps_;
  Variable weight_;  // (H*D)
  Variable unit_;    // (D) ones, a constant
};

// Causal depthwise short convolution over time (as the short convolutions on
// q, k, v of recent linear-attention models): y_t = x_t + sum_{i=1}^{w-1}
// weight[i-1] * x_{t-i} per channel, zero before the sequence start. The
// current tap is fixed at 1 and the w - 1 earlier taps start at 0, so a new
// layer starts as if there were no convolution. It gives each token its
// predecessors directly (the shift an induction/recall lookup needs) instead
// of leaving the attention to learn it. weight (w - 1, C), no weight decay.
// Under sequence parallelism each local chunk needs the w - 1 tokens before it,
// which sit at the end of another chunk (another rank's, or this rank's other
// zigzag chunk): every rank's chunk tails are all-gathered (one small
// collective; its backward returns the halo gradients to their owners).
class ShortConv : public Module {
 public:
  ShortConv(int64_t channels, int64_t width, DType dtype);
  Variable forward(const Variable& x) const;  // (B, T, C) -> (B, T, C), a whole sequence
  // x: this rank's tokens in local order (ctx.cp's layout); the whole sequence when cp is off.
  Variable forward(const Variable& x, const SequenceContext& ctx) const;
  int64_t width() const { return width_; }

 private:
  int64_t channels_, width_;
  Variable weight_;  // (w - 1, C)
};

class LightningAttention : public Mixer {
 public:
  LightningAttention(const DecoderConfig& config, int64_t layer);
  Variable forward(const Variable& x, SequenceContext& ctx) const override;
  double extra_forward_flops_per_token(int64_t context_length) const override;

  // lambda_h of this layer (H), f64.
  const Tensor& decay_lambdas() const { return decay_lambdas_; }
  double out_scale() const { return out_scale_; }

 private:
  int64_t n_heads_, head_dim_, block_size_;
  bool silu_qk_;
  double out_scale_;
  Tensor decay_lambdas_;  // (H) f64
  std::shared_ptr<Linear> q_proj_, k_proj_, v_proj_, gate_proj_, o_proj_;
  std::shared_ptr<HeadRMSNorm> out_norm_;
  std::shared_ptr<ShortConv> q_conv_, k_conv_, v_conv_;  // model.L.short_conv > 1
};

// The TransNormer decay rates of layer `layer` of `n_layers`: (H) f64.
Tensor transnormer_decay_lambdas(double decay_scale, int64_t n_heads, int64_t layer, int64_t n_layers);

}  // namespace loom
