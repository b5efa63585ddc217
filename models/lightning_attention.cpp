// The `L` mixer on the lightning_attention op, or on LASP-2 under sequence
// parallelism (parallel/lasp2.h). Fused kernels replace the op call, not this
// layer's parameters or math.
#include "models/lightning_attention.h"

#include <cmath>

#include "framework/ops.h"
#include "framework/ops_lightning.h"
#include "parallel/lasp2.h"
#include "parallel/sp_collectives.h"
#include "parallel/token_layout.h"

namespace loom {

Tensor transnormer_decay_lambdas(double decay_scale, int64_t n_heads, int64_t layer, int64_t n_layers) {
  LOOM_CHECK(decay_scale >= 0 && std::isfinite(decay_scale))
      << "model.L.decay_scale = " << decay_scale << " must be finite and >= 0";
  LOOM_CHECK(n_heads > 0 && n_layers > 0 && layer >= 0 && layer < n_layers)
      << "decay schedule: layer " << layer << " of " << n_layers << " layers, " << n_heads << " heads";
  std::vector<double> lambdas(static_cast<size_t>(n_heads));
  double depth = 1.0 - static_cast<double>(layer) / static_cast<double>(n_layers);
  for (int64_t h = 0; h < n_heads; ++h)
    lambdas[h] = decay_scale * static_cast<double>(h) / static_cast<double>(n_heads) * depth;
  return Tensor::from_vector(lambdas, {n_heads});
}

HeadRMSNorm::HeadRMSNorm(int64_t heads, int64_t head_dim, double eps, DType dtype)
    : heads_(heads), head_dim_(head_dim), eps_(eps) {
  ParamAttrs a;
  a.weight_decay = false;
  a.init.kind = InitSpec::Kind::ones;
  weight_ = register_parameter("weight", Tensor::ones({heads * head_dim}, dtype), a);  // (H*D)
  unit_ = Variable(Tensor::ones({head_dim}, dtype), false);                            // (D)
}

Variable HeadRMSNorm::forward(const Variable& x) const {
  LOOM_CHECK(x.dim() >= 2 && x.size(-2) == heads_ && x.size(-1) == head_dim_)
      << "HeadRMSNorm: input " << shape_str(x.shape()) << " must end in (H, D) = (" << heads_ << ", " << head_dim_
      << ")";
  Shape shape = x.shape();
  Shape merged(shape.begin(), shape.end() - 1);
  merged.back() = heads_ * head_dim_;
  // The unit weight follows x (the module may have moved to another device or dtype since construction).
  Variable unit = unit_.dtype() == x.dtype() && unit_.device() == x.device()
                      ? unit_
                      : Variable(Tensor::ones({head_dim_}, x.dtype(), x.device()), false);  // (D)
  Variable normed = reshape(rms_norm(x, unit, eps_), merged);  // (..., H*D)
  return reshape(mul(normed, weight_), shape);                 // (..., H, D)
}

ShortConv::ShortConv(int64_t channels, int64_t width, DType dtype) : channels_(channels), width_(width) {
  LOOM_CHECK(width >= 2) << "short convolution: width " << width << " must be >= 2";
  ParamAttrs a;
  a.weight_decay = false;
  a.init.kind = InitSpec::Kind::zeros;
  weight_ = register_parameter("weight", Tensor::zeros({width - 1, channels}, dtype), a);  // (w - 1, C)
}

Variable ShortConv::forward(const Variable& x) const {
  LOOM_CHECK(x.dim() == 3 && x.size(2) == channels_)
      << "short convolution: x " << shape_str(x.shape()) << " must be (B, T, " << channels_ << ")";
  const int64_t b = x.size(0), t = x.size(1);
  Variable y = x;
  for (int64_t i = 1; i < width_ && i < t; ++i) {
    // x shifted i steps later in time: zeros, then x[:, : T - i].
    Variable zeros(Tensor::zeros({b, i, channels_}, x.dtype(), x.device()), false);
    Variable shifted = concat({zeros, narrow(x, 1, 0, t - i)}, 1);             // (B, T, C)
    y = add(y, mul(shifted, reshape(narrow(weight_, 0, i - 1, 1), {channels_})));  // (B, T, C)
  }
  return y;
}

Variable ShortConv::forward(const Variable& x, const SequenceContext& ctx) const {
  if (!ctx.cp.active()) return forward(x);
  LOOM_CHECK(x.dim() == 3 && ctx.cp.layout) << "short convolution under cp: x " << shape_str(x.shape())
                                            << " must be (B, T_local, C) with a token layout";
  const TokenLayout& layout = *ctx.cp.layout;
  const int ranks = ctx.cp.comm->size(), rank = ctx.cp.comm->rank();
  const std::vector<TokenChunk>& mine = layout.chunks(rank);
  const int64_t halo = width_ - 1, per_rank = static_cast<int64_t>(mine.size());
  LOOM_CHECK(x.size(1) == layout.local_len()) << "short convolution under cp: " << x.size(1)
                                              << " local tokens, the layout has " << layout.local_len();
  // Every local chunk's last `halo` tokens, in local chunk order, from every rank.
  std::vector<Variable> tails;
  int64_t offset = 0;
  for (const TokenChunk& c : mine) {
    LOOM_CHECK(c.length >= halo) << "model.L.short_conv = " << width_ << " needs chunks of at least " << halo
                                 << " tokens under cp; the " << layout_kind_name(layout.kind()) << " layout of "
                                 << layout.seq_len() << " tokens over " << ranks << " ranks gives " << c.length;
    tails.push_back(narrow(x, 1, offset + c.length - halo, halo));
    offset += c.length;
  }
  Variable gathered = sp::all_gather(concat(tails, 1), ctx.cp.group("L"), 1);  // (B, ranks * per_rank * halo, C)
  std::vector<Variable> outs;
  offset = 0;
  for (const TokenChunk& c : mine) {
    // The sequence start has zeros before it. They are taken as 0 x a gathered
    // block (not a constant) so that every rank's loss depends on the gather:
    // its backward (a reduce-scatter) must run on every rank, in the same order.
    Variable before = scale(narrow(gathered, 1, 0, halo), 0.0);
    for (int r = 0; r < ranks && c.start > 0; ++r) {
      const std::vector<TokenChunk>& theirs = layout.chunks(r);
      for (int64_t k = 0; k < per_rank; ++k)
        if (theirs[static_cast<size_t>(k)].start + theirs[static_cast<size_t>(k)].length == c.start)
          before = narrow(gathered, 1, (r * per_rank + k) * halo, halo);  // the chunk just before this one
    }
    Variable y = forward(concat({before, narrow(x, 1, offset, c.length)}, 1));  // (B, halo + length, C)
    outs.push_back(narrow(y, 1, halo, c.length));
    offset += c.length;
  }
  return concat(outs, 1);
}

LightningAttention::LightningAttention(const DecoderConfig& config, int64_t layer)
    : n_heads_(config.n_heads), head_dim_(config.head_dim), block_size_(config.lightning.block),
      out_scale_(1.0 / std::sqrt(static_cast<double>(config.head_dim))) {
  const LightningOptions& o = config.lightning;
  LOOM_CHECK(o.qk_activation == "silu" || o.qk_activation == "none")
      << "model.L.qk_activation = \"" << o.qk_activation << "\" (known: silu, none)";
  LOOM_CHECK(o.block >= 1) << "model.L.block = " << o.block << " must be >= 1";
  silu_qk_ = o.qk_activation == "silu";
  decay_lambdas_ = transnormer_decay_lambdas(o.decay_scale, n_heads_, layer, config.n_layers);
  int64_t c = config.d_model, hd = n_heads_ * head_dim_;
  InitSpec out_init;
  out_init.kind = InitSpec::Kind::scaled_normal;  // writes into the residual stream
  q_proj_ = register_module("q_proj", std::make_shared<Linear>(c, hd, false, InitSpec{}, config.dtype));
  k_proj_ = register_module("k_proj", std::make_shared<Linear>(c, hd, false, InitSpec{}, config.dtype));
  v_proj_ = register_module("v_proj", std::make_shared<Linear>(c, hd, false, InitSpec{}, config.dtype));
  if (o.output_gate)
    gate_proj_ = register_module("gate_proj", std::make_shared<Linear>(c, hd, false, InitSpec{}, config.dtype));
  if (o.output_norm)
    out_norm_ = register_module("out_norm",
                                std::make_shared<HeadRMSNorm>(n_heads_, head_dim_, config.norm_eps, config.dtype));
  o_proj_ = register_module("o_proj", std::make_shared<Linear>(hd, c, false, out_init, config.dtype));
  LOOM_CHECK(o.short_conv == 0 || o.short_conv >= 2)
      << "model.L.short_conv = " << o.short_conv << " must be 0 (off) or a width >= 2";
  if (o.short_conv >= 2) {
    q_conv_ = register_module("q_conv", std::make_shared<ShortConv>(hd, o.short_conv, config.dtype));
    k_conv_ = register_module("k_conv", std::make_shared<ShortConv>(hd, o.short_conv, config.dtype));
    v_conv_ = register_module("v_conv", std::make_shared<ShortConv>(hd, o.short_conv, config.dtype));
  }
}

Variable LightningAttention::forward(const Variable& x, SequenceContext& ctx) const {
  // No positions: the decay alone orders the tokens. Under cp, LASP-2 chains
  // the ranks' chunks through their states (any layout).
  LOOM_CHECK(x.dim() == 3) << "lightning attention: x must be (B, T, C), got " << shape_str(x.shape());
  int64_t b = x.size(0), t = x.size(1), hd = n_heads_ * head_dim_;
  Variable q = q_proj_->forward(x), k = k_proj_->forward(x), v = v_proj_->forward(x);  // (B, T, H*D)
  if (q_conv_) {  // under cp each chunk gets the tokens before it from their owner
    q = q_conv_->forward(q, ctx);
    k = k_conv_->forward(k, ctx);
    v = v_conv_->forward(v, ctx);
  }
  q = reshape(q, {b, t, n_heads_, head_dim_});  // (B, T, H, D)
  k = reshape(k, {b, t, n_heads_, head_dim_});  // (B, T, H, D)
  v = reshape(v, {b, t, n_heads_, head_dim_});  // (B, T, H, D)
  if (silu_qk_) {
    q = silu(q);
    k = silu(k);
  }
  Variable o = ctx.cp.active()
                   ? lasp2_attention(q, k, v, decay_lambdas_, out_scale_, block_size_, *ctx.cp.layout,
                                     ctx.cp.group("L"))                                            // (B, T, H, D)
                   : lightning_attention(q, k, v, decay_lambdas_, Variable(), out_scale_, block_size_).out;
  if (out_norm_) o = out_norm_->forward(o);                        // (B, T, H, D)
  o = reshape(o, {b, t, hd});                                      // (B, T, H*D)
  if (gate_proj_) o = sigmoid_gate(o, gate_proj_->forward(x));     // (B, T, H*D)
  return o_proj_->forward(o);                                      // (B, T, C)
}

double LightningAttention::extra_forward_flops_per_token(int64_t context_length) const {
  (void)context_length;  // linear attention: independent of the context
  // Per head: 2*Bk*D for the intra-block scores and their weighted sum each,
  // 2*D*D for reading the state and 2*D*D for updating it (ALGORITHMS.md §11).
  double bk = static_cast<double>(block_size_), d = static_cast<double>(head_dim_);
  return (4.0 * bk * d + 4.0 * d * d) * static_cast<double>(n_heads_);
}

}  // namespace loom
