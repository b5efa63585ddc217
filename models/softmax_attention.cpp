// The `S` mixer on the reference attention op: projections, RoPE, attention
// (dense or S2 block-sparse), the per-(token, head) output scales (sigmoid
// gate, MoH routing gate) and o_proj. Under sequence parallelism the attention
// call becomes ring or all-gather attention (parallel.cp_softmax) over the cp
// group, at the tokens' global positions; fused kernels replace the call and
// fuse the scales into its epilogue, not this layer's parameters or math. The MoH
// router lives in softmax_attention_moh.cpp.
#include "models/softmax_attention.h"

#include <algorithm>
#include <cstdio>

#include "framework/ops.h"
#include "parallel/allgather_attention.h"
#include "parallel/ring_attention.h"

namespace loom {

void validate_softmax_options(const SoftmaxOptions& o, int64_t n_heads, int64_t n_kv_heads) {
  LOOM_CHECK(o.gate == "none" || o.gate == "headwise" || o.gate == "elementwise")
      << "model.S.gate = \"" << o.gate << "\" is not one of none, headwise, elementwise";
  LOOM_CHECK(o.heads == "dense" || o.heads == "moh") << "model.S.heads = \"" << o.heads
                                                     << "\" is not one of dense, moh";
  LOOM_CHECK(o.sparsity == "dense" || o.sparsity == "s2") << "model.S.sparsity = \"" << o.sparsity
                                                          << "\" is not one of dense, s2";
  if (o.heads == "moh") {
    LOOM_CHECK(o.moh.shared >= 0 && o.moh.shared < n_heads)
        << "model.S.moh.shared = " << o.moh.shared << " must be in [0, n_heads = " << n_heads << ")";
    LOOM_CHECK(o.moh.topk >= 1 && o.moh.topk <= n_heads - o.moh.shared)
        << "model.S.moh.topk = " << o.moh.topk << " must be in [1, n_heads - shared = " << n_heads - o.moh.shared
        << "] (n_heads = " << n_heads << ", shared = " << o.moh.shared << ")";
    LOOM_CHECK(o.moh.aux_coef >= 0) << "model.S.moh.aux_coef = " << o.moh.aux_coef << " must be >= 0";
  }
  if (o.sparsity == "s2") {
    LOOM_CHECK(o.s2.block >= 1 && o.s2.local_blocks >= 1 && o.s2.vert_stride >= 1)
        << "model.S.s2: block = " << o.s2.block << ", local_blocks = " << o.s2.local_blocks
        << " and vert_stride = " << o.s2.vert_stride << " must all be >= 1";
  }
  LOOM_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0)
      << "n_heads = " << n_heads << " must be a multiple of n_kv_heads = " << n_kv_heads;
}

S2Pattern s2_pattern(const SoftmaxOptions& options) {
  if (options.sparsity != "s2") return S2Pattern{};
  return S2Pattern{options.s2.block, options.s2.local_blocks, options.s2.vert_stride};
}

std::string s2_coverage_warning(const SoftmaxOptions& options, int64_t n_heads, int64_t n_kv_heads, int64_t layer) {
  if (options.sparsity != "s2" || s2_covers_context(n_kv_heads, options.s2.vert_stride)) return "";
  return "warning: layer " + std::to_string(layer) + ": S2 with " + std::to_string(n_kv_heads) +
         " distinct head patterns (kv heads; n_heads = " + std::to_string(n_heads) +
         ") < model.S.s2.vert_stride = " + std::to_string(options.s2.vert_stride) +
         ": no head attends some key blocks beyond the local window of " + std::to_string(options.s2.local_blocks) +
         " blocks";
}

SoftmaxAttention::SoftmaxAttention(const DecoderConfig& config, int64_t layer)
    : layer_(layer), n_heads_(config.n_heads), n_kv_heads_(config.n_kv_heads), head_dim_(config.head_dim),
      rope_theta_(config.rope_theta), options_(config.softmax) {
  validate_softmax_options(options_, n_heads_, n_kv_heads_);
  s2_ = s2_pattern(options_);
  std::string warning = s2_coverage_warning(options_, n_heads_, n_kv_heads_, layer);
  if (!warning.empty()) std::fprintf(stderr, "%s\n", warning.c_str());
  if (options_.heads == "moh") {
    for (int64_t l = 0; l < config.n_layers; ++l) moh_layers_ += config.layer_type(l) == 'S' ? 1 : 0;
    moh_layers_ = std::max<int64_t>(1, moh_layers_);
  }

  int64_t c = config.d_model, hd = n_heads_ * head_dim_;
  DType dt = config.dtype;
  InitSpec out_init;
  out_init.kind = InitSpec::Kind::scaled_normal;  // writes into the residual stream
  q_proj_ = register_module("q_proj", std::make_shared<Linear>(c, hd, false, InitSpec{}, dt));
  k_proj_ = register_module("k_proj", std::make_shared<Linear>(c, n_kv_heads_ * head_dim_, false, InitSpec{}, dt));
  v_proj_ = register_module("v_proj", std::make_shared<Linear>(c, n_kv_heads_ * head_dim_, false, InitSpec{}, dt));
  o_proj_ = register_module("o_proj", std::make_shared<Linear>(hd, c, false, out_init, dt));
  // Gate and router weights are initialized like the other input projections
  // (small normal): the gate starts near σ(0) = 0.5, the router near uniform.
  if (options_.gate != "none") {
    int64_t gates = options_.gate == "headwise" ? n_heads_ : hd;
    gate_proj_ = register_module("gate_proj", std::make_shared<Linear>(c, gates, false, InitSpec{}, dt));
  }
  if (options_.heads == "moh") {
    int64_t shared = options_.moh.shared, routed = n_heads_ - shared;
    router_proj_ = register_module("router_proj", std::make_shared<Linear>(c, routed, false, InitSpec{}, dt));
    if (shared > 1)
      shared_router_proj_ =
          register_module("shared_router_proj", std::make_shared<Linear>(c, shared, false, InitSpec{}, dt));
    if (shared > 0) mix_proj_ = register_module("mix_proj", std::make_shared<Linear>(c, 2, false, InitSpec{}, dt));
  }
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
  options.s2 = s2_;
  // The gate (ALGORITHMS.md §9) and MoH's head weights (§8): applied in the attention kernels'
  // epilogue on one rank (gated_attention), after the merged result under sequence parallelism.
  AttentionOutputGate gate;
  if (gate_proj_) {
    Variable z = gate_proj_->forward(x);  // (B, T, H) headwise or (B, T, H*D) elementwise
    gate.z = options_.gate == "headwise" ? z : reshape(z, {b, t, n_heads_, head_dim_});
  }
  if (router_proj_) gate.w = moh_gate(x, ctx);  // (B, T, H)
  Variable o;  // (B, T, H, D)
  if (ctx.cp.active()) {
    // Sequence parallel: this rank's queries against the whole sequence's keys,
    // by ring (K,V travel) or all-gather (LASP-2H); positions are global.
    Communicator& group = ctx.cp.group("S");
    if (ctx.cp.softmax == "ring") {
      o = ring_attention(q, k, v, options, *ctx.cp.layout, group, ctx.cp.attention_stats).out;
    } else {
      LOOM_CHECK(ctx.cp.softmax == "allgather") << "parallel.cp_softmax = \"" << ctx.cp.softmax
                                                << "\" is not one of ring, allgather";
      o = allgather_attention(q, k, v, options, *ctx.cp.layout, group, ctx.cp.attention_stats).out;
    }
    // One fused node each: σ in the activation dtype on CPU (f32/f64), in fp32 on CUDA.
    if (gate.z.defined()) o = sigmoid_gate(o, gate.z);                             // (B, T, H, D)
    if (gate.w.defined()) o = mul(o, reshape(gate.w, {b, t, n_heads_, 1}));       // (B, T, H, D)
  } else if (gate.z.defined() || gate.w.defined()) {
    o = gated_attention(q, k, v, gate, options).out;
  } else {
    o = attention(q, k, v, options).out;
  }
  Variable merged = reshape(o, {b, t, n_heads_ * head_dim_});  // (B, T, H*D)
  return o_proj_->forward(merged);                             // (B, T, C)
}

double SoftmaxAttention::extra_forward_flops_per_token(int64_t context_length) const {
  // Causal: scores and weighted sum, 2 * 2 * D per visible key and head; a
  // query sees T/2 keys on average. S2: the local window plus 1/vert_stride of
  // the rest (approximately); MoH: only h_s + k heads per token are needed.
  double len = static_cast<double>(context_length), keys = len / 2;
  if (s2_.enabled()) {
    double window = static_cast<double>(s2_.local_blocks * s2_.block);
    keys = std::min(keys, window + std::max(0.0, keys - window) / static_cast<double>(s2_.vert_stride));
  }
  double heads = static_cast<double>(router_proj_ ? options_.moh.shared + options_.moh.topk : n_heads_);
  return 4.0 * keys * head_dim_ * heads;
}

}  // namespace loom
