// MoE FFN: router, routing plan, per-expert SwiGLU dispatch, aux / z losses,
// bias balancing (see moe_ffn.h for the decisions).
#include "models/moe_ffn.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "framework/ops.h"
#include "framework/ops_moe.h"
#include "models/swiglu_ffn.h"

namespace loom {

namespace {

std::vector<int64_t> as_i64(const Tensor& t) { return t.contiguous().to_vector<int64_t>(); }

Tensor i64_tensor(const std::vector<int64_t>& v) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())});
}

}  // namespace

// ---- routing plan ----
int64_t moe_capacity(int64_t tokens, int64_t topk, int64_t experts, double capacity_factor) {
  if (capacity_factor <= 0) return 0;
  double c = std::ceil(static_cast<double>(tokens) * static_cast<double>(topk) * capacity_factor /
                       static_cast<double>(experts));
  return std::max<int64_t>(1, static_cast<int64_t>(c));
}

int64_t moe_expert_hidden(const DecoderConfig& config) {
  if (config.moe.hidden > 0) return config.moe.hidden;
  int64_t f = (config.ffn_hidden + config.moe.topk - 1) / config.moe.topk;
  return (f + 15) / 16 * 16;
}

MoeDispatch plan_moe_dispatch(const Tensor& selected, const Tensor& priority, int64_t experts, int64_t capacity) {
  LOOM_CHECK(selected.dim() == 2 && selected.dtype() == DType::i64 && priority.shape() == selected.shape())
      << "plan_moe_dispatch: selected must be i64 (N, k) and priority the same shape, got " << selected.dtype()
      << " " << shape_str(selected.shape()) << " and " << shape_str(priority.shape());
  LOOM_CHECK(experts >= 1 && capacity >= 0) << "plan_moe_dispatch: experts " << experts << ", capacity " << capacity;
  MoeDispatch d;
  d.tokens = selected.size(0);
  d.topk = selected.size(1);
  d.experts = experts;
  d.capacity = capacity;
  std::vector<int64_t> sel = as_i64(selected);
  std::vector<double> prio = priority.contiguous().to_vector<double>();
  // Slots of each expert in slot-id order (= token order): a stable sort by expert.
  std::vector<std::vector<int64_t>> by_expert(static_cast<size_t>(experts));
  for (size_t s = 0; s < sel.size(); ++s) {
    LOOM_CHECK(sel[s] >= 0 && sel[s] < experts) << "plan_moe_dispatch: expert " << sel[s] << " of slot " << s
                                                << " is outside [0, " << experts << ")";
    by_expert[static_cast<size_t>(sel[s])].push_back(static_cast<int64_t>(s));
  }
  std::vector<int64_t> slots, tokens;
  d.offsets.push_back(0);
  for (auto& list : by_expert) {
    d.load.push_back(static_cast<int64_t>(list.size()));
    if (capacity > 0 && static_cast<int64_t>(list.size()) > capacity) {
      // Keep the `capacity` highest-priority slots (ties: lower slot id), then restore slot order.
      std::stable_sort(list.begin(), list.end(), [&](int64_t a, int64_t b) { return prio[a] > prio[b]; });
      list.resize(static_cast<size_t>(capacity));
      std::sort(list.begin(), list.end());
    }
    for (int64_t s : list) {
      slots.push_back(s);
      tokens.push_back(s / d.topk);
    }
    d.kept.push_back(static_cast<int64_t>(list.size()));
    d.offsets.push_back(static_cast<int64_t>(slots.size()));
  }
  d.dropped = d.tokens * d.topk - static_cast<int64_t>(slots.size());
  d.slot = i64_tensor(slots);
  d.token = i64_tensor(tokens);
  return d;
}

// ---- experts ----
ExpertProjection::ExpertProjection(int64_t experts, int64_t in_features, int64_t out_features, InitSpec init,
                                   DType dtype) {
  ParamAttrs a;
  a.expert = true;
  a.sharding = Sharding::expert;
  a.init = init;
  weight_ = register_parameter("weight", Tensor::zeros({experts, out_features, in_features}, dtype), a);  // (E, Out, In)
}

Variable ExpertProjection::forward(const Variable& x, int64_t expert) const {
  int64_t out = weight_.size(1), in = weight_.size(2);
  Variable w = reshape(narrow(weight_, 0, expert, 1), {out, in});  // (Out, In)
  return linear(x, w);                                              // (M, Out)
}

MoeExperts::MoeExperts(int64_t experts, int64_t d_model, int64_t hidden, DType dtype) {
  InitSpec out_init;
  out_init.kind = InitSpec::Kind::scaled_normal;
  gate_proj = register_module("gate_proj", std::make_shared<ExpertProjection>(experts, d_model, hidden, InitSpec{}, dtype));
  up_proj = register_module("up_proj", std::make_shared<ExpertProjection>(experts, d_model, hidden, InitSpec{}, dtype));
  down_proj = register_module("down_proj", std::make_shared<ExpertProjection>(experts, hidden, d_model, out_init, dtype));
}

Variable MoeExperts::forward_grouped(const Variable& xs, const std::vector<int64_t>& offsets) const {
  Variable h = swiglu(grouped_linear(xs, gate_proj->weight(), offsets),
                      grouped_linear(xs, up_proj->weight(), offsets));  // (S, F)
  return grouped_linear(h, down_proj->weight(), offsets);             // (S, C)
}

Variable MoeExperts::forward(const Variable& x, int64_t expert) const {
  Variable h = swiglu(gate_proj->forward(x, expert), up_proj->forward(x, expert));  // (M, F)
  return down_proj->forward(h, expert);                                            // (M, C)
}

// ---- the layer ----
MoeFFN::MoeFFN(const DecoderConfig& config, int64_t layer)
    : options_(config.moe), layer_(layer), d_model_(config.d_model), hidden_(moe_expert_hidden(config)) {
  const MoeOptions& o = options_;
  LOOM_CHECK(o.experts >= 1 && o.topk >= 1 && o.topk <= o.experts)
      << "model.moe: topk " << o.topk << " must lie in [1, experts = " << o.experts << "]";
  LOOM_CHECK(o.router == "topk_softmax" || o.router == "softmax_topk")
      << "model.moe.router = \"" << o.router << "\" (known: topk_softmax, softmax_topk)";
  LOOM_CHECK(o.topk > 1 || o.router == "softmax_topk")
      << "model.moe.topk = 1 needs model.moe.router = softmax_topk (a softmax over one logit is constant)";
  LOOM_CHECK(o.shared_experts >= 0 && o.capacity_factor >= 0 && o.bias_rate >= 0)
      << "model.moe: shared_experts " << o.shared_experts << ", capacity_factor " << o.capacity_factor
      << ", bias_rate " << o.bias_rate << " must be >= 0";
  router_proj_ = register_module("router_proj", std::make_shared<Linear>(d_model_, o.experts, false, InitSpec{},
                                                                        config.dtype));
  experts_ = register_module("experts", std::make_shared<MoeExperts>(o.experts, d_model_, hidden_, config.dtype));
  if (o.shared_experts > 0) {
    DecoderConfig shared = config;
    shared.ffn_hidden = hidden_ * o.shared_experts;
    shared_ = register_module("shared", std::make_shared<SwiGluFFN>(shared, layer));
  }
  if (o.bias_balance) {
    ParamAttrs a;
    a.weight_decay = false;
    a.init.kind = InitSpec::Kind::zeros;
    router_bias_ = register_parameter("router_bias", Tensor::zeros({o.experts}, config.dtype), a);  // (E)
    router_bias_.set_requires_grad(false);  // updated by update_balance_bias, never by the optimizer
  }
  pending_load_ = Tensor::zeros({o.experts}, DType::f64);
}

int64_t MoeFFN::active_parameters() const {
  int64_t n = router_proj_->weight().numel() + options_.topk * 3 * d_model_ * hidden_;
  if (shared_) n += shared_->num_parameters();
  return n;
}

Variable MoeFFN::forward(const Variable& x, SequenceContext& ctx) const {
  LOOM_CHECK(x.dim() == 3 && x.size(2) == d_model_) << "MoeFFN: x must be (B, T, " << d_model_ << "), got "
                                                    << shape_str(x.shape());
  const int64_t E = options_.experts, k = options_.topk, B = x.size(0), T = x.size(1), N = B * T, C = d_model_;
  Variable x2 = reshape(x, {N, C});               // (N, C)
  Variable logits = router_logits(*router_proj_, x2);  // (N, E), f32 (f64 models: f64)
  Variable probs = softmax(logits);                    // (N, E) full softmax

  // Selection on logits + bias (host, f64); the bias never enters the weights.
  // Host synchronization: the reference plan (top-k, stable sort, capacity) is
  // built on the host from the logits; a device-side sort replaces it on GPU.
  std::vector<double> scores = logits.data().contiguous().to_vector<double>();
  if (router_bias_.defined()) {
    std::vector<double> bias = router_bias_.data().to_vector<double>();
    for (size_t i = 0; i < scores.size(); ++i) scores[i] += bias[i % static_cast<size_t>(E)];
  }
  Tensor selected = topk_indices(Tensor::from_vector(scores, {N, E}), k);  // (N, k) i64
  std::vector<int64_t> flat = as_i64(selected);                           // -> flat index t * E + e
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < k; ++j) flat[t * k + j] += t * E;
  Tensor flat_index = i64_tensor(flat);                                   // (N k)

  Variable weights;  // (N, k)
  if (options_.router == "topk_softmax") {
    weights = softmax(reshape(index_select_rows(reshape(logits, {N * E, 1}), flat_index), {N, k}));
  } else {
    weights = reshape(index_select_rows(reshape(probs, {N * E, 1}), flat_index), {N, k});
  }
  std::vector<double> all_probs = probs.data().contiguous().to_vector<double>(), prio(flat.size());
  for (size_t s = 0; s < flat.size(); ++s) prio[s] = all_probs[static_cast<size_t>(flat[s])];
  MoeDispatch plan = plan_moe_dispatch(selected, Tensor::from_vector(prio, {N, k}), E,
                                       moe_capacity(N, k, E, options_.capacity_factor));

  // Dispatch: gather rows by expert, one SwiGLU per expert, weight, scatter-add back.
  Variable y;  // (N, C)
  int64_t kept = plan.slot.numel();
  if (kept > 0) {
    Variable xs = index_select_rows(x2, plan.token);                                // (S, C)
    Variable ws = cast(index_select_rows(reshape(weights, {N * k, 1}), plan.slot), x.dtype());  // (S, 1)
    Variable ys = experts_->forward_grouped(xs, plan.offsets);                      // (S, C)
    y = index_add_rows(mul(ys, ws), plan.token, N);                                 // (N, C)
  } else {
    y = Variable(Tensor::zeros({N, C}, x.dtype()));
  }
  if (shared_) y = add(y, shared_->forward(x2, ctx));  // (N, C): always-on shared experts

  // Aux load-balance loss E sum_i f_i P_i (f constant) and z-loss mean_t lse_t^2.
  // Under cp both are over the whole sequence: f and P from loads and
  // probabilities summed over the cp group (P differentiably), the aux value,
  // identical on every rank, enters each rank's share as aux / cp; the z-loss
  // share is the local sum over the global token count.
  const int cp = ctx.cp.size();
  const double tokens = static_cast<double>(N) * cp;  // over the whole sequence (equal shards)
  Tensor loads = Tensor::empty({E}, DType::f64);
  for (int64_t e = 0; e < E; ++e) loads.data<double>()[e] = static_cast<double>(plan.load[e]);
  sum_over_sequence(loads, ctx, "moe");
  std::vector<double> share = loads.to_vector<double>();
  for (double& fr : share) fr /= tokens * static_cast<double>(k);
  Variable f(Tensor::from_vector(share, {E}).to(probs.dtype()));  // (E) constant
  Variable mean_probs = cp > 1 ? scale(sum_over_sequence(sum(probs, 0), ctx, "moe"), 1.0 / tokens)
                               : mean(probs, 0);                               // (E)
  Variable aux = scale(sum(mul(mean_probs, f)), static_cast<double>(E));       // ()
  Variable lse = logsumexp(logits);                                            // (N)
  Variable z = cp > 1 ? scale(sum(mul(lse, lse)), 1.0 / tokens) : mean(mul(lse, lse));  // () share
  // Both losses are formed in the router's dtype and enter the loss in the compute dtype.
  if (options_.aux_coef > 0) ctx.aux_losses.push_back(cast(scale(aux, options_.aux_coef / cp), x.dtype()));
  if (options_.z_coef > 0) ctx.aux_losses.push_back(cast(scale(z, options_.z_coef), x.dtype()));
  const std::string prefix = "layer" + std::to_string(layer_) + ".moe.";
  double max_load = static_cast<double>(*std::max_element(plan.load.begin(), plan.load.end()));
  ctx.deferred_stats[prefix + "aux"] = {aux.data(), 1.0};
  ctx.deferred_stats[prefix + "z"] = {z.data(), static_cast<double>(cp)};  // this rank's mean (stats average over ranks)
  ctx.stats[prefix + "max_load"] = max_load / (static_cast<double>(N * k) / static_cast<double>(E));
  ctx.stats[prefix + "dropped"] = static_cast<double>(plan.dropped) / static_cast<double>(N * k);

  if (router_bias_.defined() && grad_mode_enabled()) {
    double* pending = pending_load_.data<double>();  // shared storage: a const Tensor still writes it
    for (int64_t e = 0; e < E; ++e) pending[e] += static_cast<double>(plan.load[e]);
  }
  return reshape(y, {B, T, C});
}

void MoeFFN::update_balance_bias() const {
  if (!router_bias_.defined()) return;
  const int64_t E = options_.experts;
  double* load = pending_load_.data<double>();
  double total = std::accumulate(load, load + E, 0.0);
  if (total > 0) {
    double mean_load = total / static_cast<double>(E);
    std::vector<double> bias = router_bias_.data().to_vector<double>();
    for (int64_t e = 0; e < E; ++e) {
      double sign = load[e] > mean_load ? 1.0 : (load[e] < mean_load ? -1.0 : 0.0);
      bias[e] -= options_.bias_rate * sign;  // overloaded experts become less attractive
    }
    Tensor updated = router_bias_.data();  // shares storage: written in place
    updated.copy_(Tensor::from_vector(bias, {E}));
  }
  Tensor pending = pending_load_;
  pending.zero_();
}

void update_moe_balance_biases(const DecoderLM& model, const std::function<void(Tensor& load)>& reduce_loads) {
  for (const auto& block : model.blocks()) {
    const auto* moe = dynamic_cast<const MoeFFN*>(&block->ffn());
    if (moe == nullptr || !moe->router_bias().defined()) continue;
    if (reduce_loads) {
      Tensor load = moe->pending_load();  // shares storage
      reduce_loads(load);
    }
    moe->update_balance_bias();
  }
}

}  // namespace loom
