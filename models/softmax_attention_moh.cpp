// MoH router of the `S` mixer (ALGORITHMS.md §8): the per-(token, head) gate
//   p = softmax(W_r x) over the E routed heads, routed = topk(p, k),
//   g_r = k · p[routed] / Σ p[routed] (others 0), g_s = h_s · softmax(W_s x)
//   (h_s > 1; else 1), [α1, α2] = 2 · softmax(W_h x), gate = [α1·g_s, α2·g_r],
// and the load-balance loss aux = E · Σ_i mean_t(p_ti) · mean_t(1[i ∈ routed_t]).
// The top-k choice is a constant mask (not differentiable); gradients flow
// through p of the selected entries. The reference scales all heads' outputs;
// packing the selected (token, head) rows comes with the CUDA kernels.
#include <algorithm>
#include <numeric>
#include <string>

#include "framework/ops.h"
#include "models/softmax_attention.h"

namespace loom {

namespace {

// 0/1 mask (N, E) of the k largest entries of each row of p (N, E); ties go to
// the lower index, so the choice is deterministic. Also counts per column.
Tensor topk_mask(const Tensor& p, int64_t k, std::vector<int64_t>& counts) {
  int64_t n = p.size(0), e = p.size(1);
  std::vector<double> probs = p.contiguous().to_vector<double>();
  std::vector<double> mask(static_cast<size_t>(n * e), 0.0);
  std::vector<int64_t> order(static_cast<size_t>(e));
  counts.assign(static_cast<size_t>(e), 0);
  for (int64_t r = 0; r < n; ++r) {
    const double* row = probs.data() + r * e;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [row](int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    for (int64_t i = 0; i < k; ++i) {
      mask[static_cast<size_t>(r * e + order[i])] = 1.0;
      ++counts[static_cast<size_t>(order[i])];
    }
  }
  return Tensor::from_vector(mask, {n, e}).to(p.dtype());
}

}  // namespace

Variable SoftmaxAttention::moh_gate(const Variable& x, SequenceContext& ctx) const {
  int64_t b = x.size(0), t = x.size(1), n = b * t;
  int64_t shared = options_.moh.shared, routed = n_heads_ - shared, k = options_.moh.topk;
  // The router runs in f32 (f64 models: f64), the gate returns in x's dtype (layer.h: router_logits).
  Variable p = reshape(softmax(router_logits(*router_proj_, x), -1), {n, routed});  // (B*T, E)
  std::vector<int64_t> counts;
  Variable chosen(topk_mask(p.data(), k, counts));              // (B*T, E) constant 0/1
  Variable kept = mul(p, chosen);                               // (B*T, E)
  Variable g_r = scale(div(kept, sum(kept, 1, true)), static_cast<double>(k));  // (B*T, E)
  Variable gate = g_r;                                          // (B*T, H) when there is no shared head
  if (shared > 0) {
    Variable g_s = shared > 1
                       ? scale(softmax(reshape(router_logits(*shared_router_proj_, x), {n, shared}), -1),
                               static_cast<double>(shared))      // (B*T, h_s)
                       : Variable(Tensor::ones({n, 1}, p.dtype()));  // (B*T, 1)
    Variable alpha = scale(softmax(reshape(router_logits(*mix_proj_, x), {n, 2}), -1), 2.0);  // (B*T, 2)
    gate = concat({mul(narrow(alpha, 1, 0, 1), g_s), mul(narrow(alpha, 1, 1, 1), g_r)}, 1);  // (B*T, H)
  }

  // Load balance: E · Σ_i mean_t(p_ti) · f_i with f_i the fraction of tokens routed to head i.
  // Under cp both means are over the whole sequence (counts and probabilities
  // summed over the cp group, P differentiably); each rank adds aux / cp.
  const int cp = ctx.cp.size();
  const double tokens = static_cast<double>(n) * cp;
  Tensor routed_counts = Tensor::empty({routed}, DType::f64);
  for (int64_t i = 0; i < routed; ++i) routed_counts.data<double>()[i] = static_cast<double>(counts[i]);
  sum_over_sequence(routed_counts, ctx, "S");
  std::vector<double> fractions = routed_counts.to_vector<double>();
  for (double& fr : fractions) fr /= tokens;
  Variable f(Tensor::from_vector(fractions, {routed}).to(p.dtype()));  // (E) constant
  Variable mean_p = cp > 1 ? scale(sum_over_sequence(sum(p, 0), ctx, "S"), 1.0 / tokens) : mean(p, 0);  // (E)
  Variable aux = scale(sum(mul(mean_p, f)), static_cast<double>(routed));  // ()
  std::string prefix = "layer" + std::to_string(layer_) + ".moh.";
  ctx.deferred_stats[prefix + "aux"] = {aux.data(), 1.0};
  for (int64_t i = 0; i < routed; ++i)     // share of the B*T*k routed slots per routed head (1/E if balanced)
    ctx.stats[prefix + "head" + std::to_string(shared + i) + ".load"] = static_cast<double>(counts[i]) / (n * k);
  if (options_.moh.aux_coef > 0)
    ctx.aux_losses.push_back(
        cast(scale(aux, options_.moh.aux_coef / static_cast<double>(moh_layers_ * cp)), x.dtype()));
  return cast(reshape(gate, {b, t, n_heads_}), x.dtype());  // (B, T, H)
}

}  // namespace loom
