// Mixture-of-experts FFN (ALGORITHMS.md §10), the reference dispatch: router
// logits -> top-k -> token slots sorted by expert (stable) -> gather -> one
// SwiGLU per expert on its rows (grouped GEMMs) -> scale by the routing weight -> scatter-add
// back, plus optional always-on shared experts. Differentiable end to end
// through framework ops (ops_moe: index_select_rows / index_add_rows /
// logsumexp); the selection itself is not differentiable.
//
// Parameter names (under blocks.{i}.ffn.):
//   router_proj.weight         (E, C)    no bias
//   experts.gate_proj.weight   (E, F, C) expert = true, Sharding::expert
//   experts.up_proj.weight     (E, F, C) expert = true, Sharding::expert
//   experts.down_proj.weight   (E, C, F) expert = true, Sharding::expert
//   shared.{gate,up}_proj.weight (F*S, C), shared.down_proj.weight (C, F*S)
//                              only when shared_experts = S > 0
//   router_bias                (E)       only with bias_balance; requires_grad
//                              false (no gradient, the optimizer skips it), so
//                              it travels in state_dict / checkpoints
// F = moe.hidden, or (0) ffn_hidden / topk rounded up to a multiple of 16.
//
// Decisions:
// - The router runs in the model dtype: on CPU that is f32 or f64, so "router
//   in fp32" holds; a bf16 model needs a differentiable cast here (left for the
//   CUDA path).
// - Selection is top-k of (logits + router_bias) in both router modes (softmax
//   is monotone per token, so "softmax then top-k" selects the same experts).
//   topk_softmax: weights = softmax over the k selected logits (sum to 1).
//   softmax_topk: weights = the selected full-softmax probabilities, NOT
//   renormalized (ALGORITHMS.md: "softmax over all then top-k"; with k = 1 a
//   renormalized weight would be constant 1 and the router would get no
//   gradient from the LM loss). The bias never enters the weights.
// - Shared experts: one dense SwiGLU of width F * S (the same function as S
//   separate SwiGLUs of width F whose outputs are summed).
// - Capacity (capacity_factor > 0): ceil(N k cf / E) slots per expert, N = B*T
//   tokens of this forward. An expert over capacity keeps the slots with the
//   highest full-softmax probability (ties: lower token, then lower choice);
//   dropped slots contribute 0 (the token keeps its other experts and the
//   shared experts). Loads, f_i of the aux loss and max_load count the routing
//   decision before dropping.
// - The aux and z losses are computed on every forward; they join
//   ctx.aux_losses scaled by aux_coef / z_coef when the coefficient is > 0.
//   ctx.stats gets the unscaled values: layer{l}.moe.aux (E sum f_i P_i),
//   layer{l}.moe.z (mean lse^2), layer{l}.moe.max_load (max / mean slots per
//   expert), layer{l}.moe.dropped (dropped share of the N k slots).
// - Bias balancing: a forward that records a graph (grad mode on) adds its
//   loads to pending_load(); update_balance_bias() then moves each bias by
//   -u sign(load - mean load) and clears them. Counting only recorded
//   forwards makes evaluation free of side effects and counts a checkpointed
//   block once (its no-grad first pass is skipped, the recompute counts).
//   Under data parallelism the trainer must all-reduce pending_load() before
//   the update so every rank keeps the same bias.
// - The experts run as three grouped GEMMs (ops_moe grouped_linear: one BLAS
//   call per non-empty expert on its contiguous rows); MoeExperts::forward(x, e)
//   is the per-expert reference the tests compare against.
#pragma once

#include <functional>
#include <vector>

#include "models/decoder.h"

namespace loom {

class SwiGluFFN;

// The routing plan of one forward (host side, deterministic).
struct MoeDispatch {
  int64_t tokens = 0, topk = 0, experts = 0;
  int64_t capacity = 0;          // 0 = dropless
  std::vector<int64_t> load;     // (E) slots routed to each expert, before dropping
  std::vector<int64_t> kept;     // (E) slots each expert processes
  std::vector<int64_t> offsets;  // (E + 1) start of each expert's segment of the sorted slots
  Tensor slot;                   // (S) i64: slot id t * k + j of every kept slot, sorted by expert, then slot id
  Tensor token;                  // (S) i64: the token of each kept slot
  int64_t dropped = 0;           // N k - S
};

// selected (N, k) i64 experts per token, priority (N, k) floating (higher is
// kept first when an expert is over capacity), capacity 0 = dropless.
MoeDispatch plan_moe_dispatch(const Tensor& selected, const Tensor& priority, int64_t experts, int64_t capacity);
// ceil(tokens * topk * capacity_factor / experts); 0 when capacity_factor <= 0 (dropless).
int64_t moe_capacity(int64_t tokens, int64_t topk, int64_t experts, double capacity_factor);
// The expert width F: options.hidden, or ffn_hidden / topk rounded up to a multiple of 16.
int64_t moe_expert_hidden(const DecoderConfig& config);

// One stacked projection of all experts: weight (E, Out, In).
class ExpertProjection : public Module {
 public:
  ExpertProjection(int64_t experts, int64_t in_features, int64_t out_features, InitSpec init, DType dtype);
  const Variable& weight() const { return weight_; }
  // x (M, In) -> (M, Out) through expert e's (Out, In) slice.
  Variable forward(const Variable& x, int64_t expert) const;

 private:
  Variable weight_;
};

class MoeExperts : public Module {
 public:
  MoeExperts(int64_t experts, int64_t d_model, int64_t hidden, DType dtype);
  // x (M, C) -> (M, C): expert e's SwiGLU (the per-expert reference).
  Variable forward(const Variable& x, int64_t expert) const;
  // xs (S, C) sorted by expert, rows [offsets[e], offsets[e+1]) for expert e -> (S, C):
  // every expert's SwiGLU on its rows through grouped GEMMs.
  Variable forward_grouped(const Variable& xs, const std::vector<int64_t>& offsets) const;
  std::shared_ptr<ExpertProjection> gate_proj, up_proj, down_proj;
};

class MoeFFN : public FeedForward {
 public:
  MoeFFN(const DecoderConfig& config, int64_t layer);
  // x (B, T, C) -> (B, T, C); adds aux / z losses and stats to ctx.
  Variable forward(const Variable& x, SequenceContext& ctx) const override;
  // Router + k experts + shared experts.
  int64_t active_parameters() const override;

  // Loss-free balancing step (no-op unless moe.bias_balance); see the notes
  // above. const like forward: it writes the bias buffer and the pending loads
  // (routing state, not trained), so callers can reach it through Block::ffn().
  void update_balance_bias() const;
  // (E) f64: slots routed to each expert by recorded forwards since the last
  // update; shares storage, so the trainer can all-reduce it in place.
  Tensor pending_load() const { return pending_load_; }
  const Variable& router_bias() const { return router_bias_; }  // (E); undefined without bias_balance
  const MoeOptions& options() const { return options_; }
  int64_t expert_hidden() const { return hidden_; }
  const Linear& router_proj() const { return *router_proj_; }
  const MoeExperts& experts() const { return *experts_; }

 private:
  MoeOptions options_;
  int64_t layer_, d_model_, hidden_;
  std::shared_ptr<Linear> router_proj_;
  std::shared_ptr<MoeExperts> experts_;
  std::shared_ptr<SwiGluFFN> shared_;  // null without shared experts
  Variable router_bias_;
  Tensor pending_load_;  // its storage is written by const forward: routing statistics, not model state
};

// The trainer's once-per-step call: update_balance_bias() on every MoE block
// of `model` (no-op for dense blocks or without bias_balance). `reduce_loads`,
// when given, sums each block's pending_load() (E, f64) over the data-parallel
// group in place first, so that every rank applies the same update.
void update_moe_balance_biases(const DecoderLM& model, const std::function<void(Tensor& load)>& reduce_loads = {});

}  // namespace loom
