// MoE FFN end to end: whole-layer gradients (router, routed and shared
// experts, aux and z losses) against finite differences in f64, activation
// checkpointing, and a tiny decoder with ffn: moe that trains.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "framework/ops.h"
#include "models/moe_ffn.h"
#include "tests/testing.h"

namespace loom {
namespace {

DecoderConfig layer_config() {
  DecoderConfig cfg;
  cfg.d_model = 6;  // C
  cfg.ffn_hidden = 8;
  cfg.ffn = "moe";
  cfg.dtype = DType::f64;
  cfg.moe.experts = 4;  // E
  cfg.moe.topk = 2;     // k
  cfg.moe.hidden = 4;   // F
  cfg.moe.aux_coef = 0.1;
  cfg.moe.z_coef = 0.1;
  return cfg;
}

// Smallest gap between the k-th and (k+1)-th router logit over tokens.
double selection_margin(const MoeFFN& moe, const Tensor& x) {
  int64_t e = moe.options().experts, k = moe.options().topk;
  NoGradGuard no_grad;
  std::vector<double> z = linear(Variable(x.reshape({-1, x.size(2)})), moe.router_proj().weight()).data().to_vector<double>();
  double margin = 1e9;
  for (size_t t = 0; t < z.size() / static_cast<size_t>(e); ++t) {
    std::vector<double> r(z.begin() + t * e, z.begin() + (t + 1) * e);
    std::sort(r.rbegin(), r.rend());
    margin = std::min(margin, r[k - 1] - r[k]);
  }
  return margin;
}

// L = <y, R> + aux losses; checks dL/dx and dL/dparameter entry by entry.
void check_layer_gradients(const DecoderConfig& cfg, uint64_t seed) {
  MoeFFN moe(cfg, 0);
  moe.initialize(seed, 0.5, 2);
  Tensor x = testing::random_tensor({1, 5, 6}, seed + 1);  // (B, T, C)
  Tensor r = testing::random_tensor({1, 5, 6}, seed + 2);
  ASSERT_GT(selection_margin(moe, x), 1e-3) << "pick another seed: a selection boundary is too close";
  auto loss = [&](const Variable& xv) {
    SequenceContext ctx;
    Variable l = sum(mul(moe.forward(xv, ctx), Variable(r)));
    for (const Variable& a : ctx.aux_losses) l = add(l, a);
    return l;
  };
  Variable xv(x, true);
  moe.zero_grad();
  loss(xv).backward();
  std::vector<std::pair<std::string, Variable>> checked{{"x", xv}};
  for (const auto& p : moe.named_parameters()) checked.push_back({p.name, p.var});
  for (auto& [name, var] : checked) {
    ASSERT_TRUE(var.grad().defined()) << name;
    Tensor w = var.data();
    double* data = w.data<double>();
    std::vector<double> grad = var.grad().contiguous().to_vector<double>();
    for (int64_t j = 0; j < w.numel(); ++j) {
      double saved = data[j], eps = 1e-6, plus, minus;
      {
        NoGradGuard no_grad;
        data[j] = saved + eps;
        plus = loss(Variable(x)).item();
        data[j] = saved - eps;
        minus = loss(Variable(x)).item();
        data[j] = saved;
      }
      double numeric = (plus - minus) / (2 * eps);
      ASSERT_NEAR(grad[j], numeric, 1e-7 + 1e-5 * std::fabs(numeric)) << name << "[" << j << "]";
    }
  }
}

TEST(MoeGradients, TopkSoftmaxWithSharedExpertsMatchesFiniteDifferences) {
  DecoderConfig cfg = layer_config();
  cfg.moe.shared_experts = 1;
  check_layer_gradients(cfg, 11);
}

TEST(MoeGradients, SoftmaxTopkWithCapacityMatchesFiniteDifferences) {
  DecoderConfig cfg = layer_config();
  cfg.moe.router = "softmax_topk";
  cfg.moe.capacity_factor = 1.0;  // capacity ceil(5 * 2 / 4) = 3
  check_layer_gradients(cfg, 21);
}

DecoderConfig tiny_decoder() {
  DecoderConfig c;
  c.vocab_size = 13;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.ffn_hidden = 32;
  c.ffn = "moe";
  c.moe.experts = 4;
  c.moe.topk = 2;
  c.moe.shared_experts = 1;
  c.moe.bias_balance = true;
  c.moe.bias_rate = 0.01;
  return c;
}

TEST(MoeDecoder, ActivationCheckpointingGivesTheSameGradientsAndLoads) {
  DecoderConfig c = tiny_decoder();
  c.dtype = DType::f64;
  DecoderLM plain(c);
  c.activation_checkpointing = true;
  DecoderLM ckpt(c);
  plain.initialize(5, 0.3, 2);
  ckpt.initialize(5, 0.3, 2);
  Tensor ids = testing::random_indices({2, 6}, 13, 1), targets = testing::random_indices({2, 6}, 13, 2);
  SequenceContext c1, c2;
  Variable l1 = plain.loss(ids, targets, c1), l2 = ckpt.loss(ids, targets, c2);
  l1.backward();
  l2.backward();
  EXPECT_NEAR(l1.item(), l2.item(), 1e-12);
  EXPECT_EQ(c1.aux_losses.size(), 4u);  // aux + z per layer
  EXPECT_EQ(c1.all_stats(), c2.all_stats());
  auto p1 = plain.named_parameters(), p2 = ckpt.named_parameters();
  for (size_t i = 0; i < p1.size(); ++i) {
    if (!p1[i].var.requires_grad()) continue;  // the router bias
    EXPECT_TENSOR_CLOSE(p2[i].var.grad(), p1[i].var.grad(), 1e-10, 1e-12) << p1[i].name;
  }
  for (size_t b = 0; b < plain.blocks().size(); ++b) {
    const auto& m1 = dynamic_cast<const MoeFFN&>(plain.blocks()[b]->ffn());
    const auto& m2 = dynamic_cast<const MoeFFN&>(ckpt.blocks()[b]->ffn());
    EXPECT_EQ(m1.pending_load().to_vector<double>(), m2.pending_load().to_vector<double>());
    std::vector<double> load = m2.pending_load().to_vector<double>();
    double total = 0;
    for (double v : load) total += v;
    EXPECT_EQ(total, 12.0 * 2);  // counted once: B T k slots
  }
}

TEST(MoeDecoder, TinyModelTrainsWithPlainSgd) {
  DecoderLM model(tiny_decoder());
  model.initialize(7, 0.02, 2);
  Tensor ids = testing::random_indices({2, 16}, 13, 3), targets = testing::random_indices({2, 16}, 13, 4);
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    model.zero_grad();
    SequenceContext ctx;
    Variable loss = model.loss(ids, targets, ctx);
    loss.backward();
    ASSERT_TRUE(std::isfinite(loss.item()));
    if (step == 0) {
      first = loss.item();
      EXPECT_EQ(ctx.stats.count("layer1.moe.max_load"), 1u);
      EXPECT_EQ(ctx.stats.count("layer0.moe.dropped"), 1u);
    }
    last = loss.item();
    for (auto& p : model.named_parameters()) {
      if (!p.var.grad().defined()) continue;
      Tensor w = p.var.data();
      float* data = w.data<float>();
      std::vector<float> g = p.var.grad().contiguous().to_vector<float>();
      for (int64_t j = 0; j < w.numel(); ++j) data[j] -= 0.5f * g[j];
    }
    int reduced = 0;
    update_moe_balance_biases(model, [&](Tensor& load) {
      EXPECT_EQ(load.shape(), (Shape{4}));
      ++reduced;
    });
    EXPECT_EQ(reduced, 2);  // one call per MoE block
  }
  EXPECT_LT(last, first - 0.5) << "first " << first << ", last " << last;  // 2.58 -> 1.95 when written
  for (const auto& block : model.blocks()) {
    std::vector<double> bias = dynamic_cast<const MoeFFN&>(block->ffn()).router_bias().data().to_vector<double>();
    double spread = *std::max_element(bias.begin(), bias.end()) - *std::min_element(bias.begin(), bias.end());
    EXPECT_GT(spread, 0.0);  // the balancing updates ran
  }
}

}  // namespace
}  // namespace loom
