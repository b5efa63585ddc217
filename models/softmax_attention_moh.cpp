// MoH router of the `S` mixer (ALGORITHMS.md §8): the per-(token, head) gate
//   p = softmax(W_r x) over the E routed heads, routed = topk(p, k),
//   g_r = k · p[routed] / Σ p[routed] (others 0), g_s = h_s · softmax(W_s x)
//   (h_s > 1; else 1), [α1, α2] = 2 · softmax(W_h x), gate = [α1·g_s, α2·g_r],
// and the load-balance loss aux = E · Σ_i mean_t(p_ti) · mean_t(1[i ∈ routed_t]).
// The top-k choice is a constant mask (not differentiable); gradients flow
// through p of the selected entries. Everything stays on the router's device
// (the mask, the counts, the loads: deferred statistics), so the forward waits
// on no host read. Every head's attention runs and is scaled by the gate
// (kernels/NOTES.md: packing the selected rows measured against that).
#include <memory>
#include <string>
#include <vector>

#include "framework/ops.h"
#include "framework/ops_moe.h"
#include "models/softmax_attention.h"

namespace loom {

Variable SoftmaxAttention::moh_gate(const Variable& x, SequenceContext& ctx) const {
  int64_t b = x.size(0), t = x.size(1), n = b * t;
  int64_t shared = options_.moh.shared, routed = n_heads_ - shared, k = options_.moh.topk;
  // The router's logits are f32 (f64 models: f64), the gate returns in x's dtype (layer.h:
  // router_logits). Its (up to) three projections are one product, the weights stacked
  // (bias-free); 16-bit x on CUDA is multiplied as it is with fp32 accumulation (linear_wide_out).
  const DType rd = router_dtype(x.dtype());
  const int64_t hs = shared > 1 ? shared : 0;  // shared-router columns
  std::vector<Variable> weights{cast(router_proj_->weight(), rd)};
  if (hs > 0) weights.push_back(cast(shared_router_proj_->weight(), rd));
  if (shared > 0) weights.push_back(cast(mix_proj_->weight(), rd));
  Variable logits = linear_wide_out(reshape(x, {n, x.size(2)}),
                                    weights.size() == 1 ? weights[0] : concat(weights, 0));  // (B*T, E [+ h_s] [+ 2])
  Variable p = softmax(narrow(logits, 1, 0, routed), -1);                          // (B*T, E)
  Tensor mask = topk_mask(p.data(), k);                        // (B*T, E) constant 0/1, on p's device
  Variable chosen(mask);
  // g_r, g_s, α and their product in one op (framework/ops_moe.h: moh_gate).
  Variable gate = loom::moh_gate(p, mask, shared > 0 ? narrow(logits, 1, routed, hs + 2) : Variable(), shared, k);  // (B*T, H)

  // Load balance: E · Σ_i mean_t(p_ti) · f_i with f_i the fraction of tokens routed to head i.
  // Under cp both means are over the whole sequence (counts and probabilities
  // summed over the cp group, P differentiably); each rank adds aux / cp.
  const int cp = ctx.cp.size();
  const double tokens = static_cast<double>(n) * cp;
  Tensor counts = sum(chosen, 0).data();  // (E) tokens routed to each head here (exact below 2^24 in f32)
  Tensor routed_counts = counts.clone();
  sum_over_sequence(routed_counts, ctx, "S");
  Variable f(scale(Variable(routed_counts), 1.0 / tokens).data());  // (E) constant: fractions of the sequence
  Variable mean_p = cp > 1 ? scale(sum_over_sequence(sum(p, 0), ctx, "S"), 1.0 / tokens) : mean(p, 0);  // (E)
  Variable aux = scale(sum(mul(mean_p, f)), static_cast<double>(routed));  // ()
  std::string prefix = "layer" + std::to_string(layer_) + ".moh.";
  ctx.deferred_stats[prefix + "aux"] = {aux.data(), 1.0};
  // Share of the B*T*k routed slots per routed head (1/E if balanced); the heads share one
  // host copy of the counts, so reading them all waits once.
  const auto counts_host = std::make_shared<std::vector<double>>();
  for (int64_t i = 0; i < routed; ++i)
    ctx.deferred_stats[prefix + "head" + std::to_string(shared + i) + ".load"] = {
        counts, 1.0 / static_cast<double>(n * k), i, counts_host};
  if (options_.moh.aux_coef > 0)
    ctx.aux_losses.push_back(
        cast(scale(aux, options_.moh.aux_coef / static_cast<double>(moh_layers_ * cp)), x.dtype()));
  return cast(reshape(gate, {b, t, n_heads_}), x.dtype());  // (B, T, H)
}

}  // namespace loom
