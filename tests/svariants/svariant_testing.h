// Helpers of the S-variant tests (gate, MoH, S2): tiny f64 configs, weight
// copying by name, and a finite-difference check of the whole mixer over its
// input and every parameter, with the auxiliary losses in the objective.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include "framework/ops.h"
#include "models/softmax_attention.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom::testing {

inline DecoderConfig svariant_config(int64_t heads = 4, int64_t kv_heads = 4, int64_t head_dim = 2) {
  DecoderConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 1;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.ffn_hidden = 12;
  c.dtype = DType::f64;
  return c;
}

inline std::map<std::string, Tensor> parameters_by_name(const Module& m) {
  std::map<std::string, Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.name] = p.var.data();
  return out;
}

// Copies every parameter of `from` that `to` also has (same name) into `to`.
inline void copy_shared_parameters(const Module& from, Module& to) {
  std::map<std::string, Tensor> src = parameters_by_name(from);
  for (const auto& p : to.named_parameters()) {
    auto it = src.find(p.name);
    if (it != src.end()) Tensor(p.var.data()).copy_(it->second);
  }
}

inline void fill_parameter(Module& m, const std::string& name, double value) {
  std::map<std::string, Tensor> params = parameters_by_name(m);
  ASSERT_TRUE(params.count(name)) << name;
  params[name].fill_(value);
}

struct MixerRun {
  Tensor y;
  SequenceContext ctx;
};
inline MixerRun run_mixer(const Mixer& m, const Tensor& x, const Tensor& positions) {
  NoGradGuard no_grad;
  MixerRun r;
  r.ctx.positions = positions;
  r.y = m.forward(Variable(x), r.ctx).data();
  return r;
}

// L = <y, R> + Σ aux_losses.
inline Variable mixer_objective(const Mixer& m, const Variable& x, const Tensor& r, const Tensor& positions) {
  SequenceContext ctx;
  ctx.positions = positions;
  Variable loss = sum(mul(m.forward(x, ctx), Variable(r)));
  for (const Variable& aux : ctx.aux_losses) loss = add(loss, aux);
  return loss;
}

// Analytic gradients of L w.r.t. x and every parameter against central
// differences, element by element (all elements: the shapes are tiny).
inline ::testing::AssertionResult mixer_gradcheck(Mixer& m, const Tensor& x, const Tensor& positions,
                                                  uint64_t seed = 77, double tol = 1e-6) {
  Tensor r = random_tensor({x.size(0), x.size(1), x.size(2)}, seed);
  Variable xv(x.clone(), true);
  m.zero_grad();
  mixer_objective(m, xv, r, positions).backward();
  auto objective = [&](const Tensor& input) {
    NoGradGuard no_grad;
    return mixer_objective(m, Variable(input), r, positions).item();
  };
  std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>> checks;  // name -> (value, grad)
  Tensor xc = x.clone();
  checks.push_back({"x", {xc, xv.grad()}});
  for (const auto& p : m.named_parameters()) {
    if (!p.var.grad().defined()) return ::testing::AssertionFailure() << "no gradient for " << p.name;
    checks.push_back({p.name, {p.var.data(), p.var.grad()}});
  }
  int64_t checked = 0;
  for (auto& [name, vg] : checks) {
    double* data = vg.first.data<double>();
    const double* grad = vg.second.contiguous().data<double>();
    for (int64_t j = 0; j < vg.first.numel(); ++j) {
      double saved = data[j], eps = 1e-6;
      data[j] = saved + eps;
      double plus = objective(xc);
      data[j] = saved - eps;
      double minus = objective(xc);
      data[j] = saved;
      double numeric = (plus - minus) / (2 * eps);
      if (std::fabs(grad[j] - numeric) > tol + 1e-5 * std::fabs(numeric))
        return ::testing::AssertionFailure() << name << "[" << j << "]: analytic " << grad[j] << ", numeric "
                                             << numeric << " (" << checked << " elements passed before)";
      ++checked;
    }
  }
  return ::testing::AssertionSuccess() << checked << " elements";
}

// Smallest gap, over tokens, between the k-th and (k+1)-th routing probability:
// finite differences must not flip the top-k choice.
inline double min_topk_gap(const SoftmaxAttention& m, const Tensor& x, int64_t k) {
  NoGradGuard no_grad;
  Tensor w = testing::parameters_by_name(m)["router_proj.weight"];
  Tensor p = softmax(linear(Variable(x), Variable(w)), -1).data();  // (B, T, E)
  int64_t e = p.size(-1);
  if (k == e) return 1.0;
  std::vector<double> v = p.to_vector<double>();
  double gap = 1.0;
  for (size_t r = 0; r < v.size(); r += static_cast<size_t>(e)) {
    std::vector<double> row(v.begin() + static_cast<int64_t>(r), v.begin() + static_cast<int64_t>(r) + e);
    std::sort(row.rbegin(), row.rend());
    gap = std::min(gap, row[static_cast<size_t>(k - 1)] - row[static_cast<size_t>(k)]);
  }
  return gap;
}

}  // namespace loom::testing
