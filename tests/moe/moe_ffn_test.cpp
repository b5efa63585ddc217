// MoE FFN: one expert equals the dense SwiGLU, aux / z losses by hand,
// capacity dropping, router modes, bias balancing, names and active
// parameters, whole-layer gradients against finite differences.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "models/moe_ffn.h"
#include "models/swiglu_ffn.h"
#include "tests/testing.h"

namespace loom {
namespace {

DecoderConfig moe_config(int64_t c, int64_t e, int64_t k, int64_t f) {
  DecoderConfig cfg;
  cfg.d_model = c;
  cfg.ffn_hidden = f;
  cfg.ffn = "moe";
  cfg.dtype = DType::f64;
  cfg.moe.experts = e;
  cfg.moe.topk = k;
  cfg.moe.hidden = f;
  cfg.moe.router = k == 1 ? "softmax_topk" : "topk_softmax";
  return cfg;
}

void set(const Variable& v, const std::vector<double>& values) {
  Tensor t = v.data();  // shares storage
  t.copy_(Tensor::from_vector(values, t.shape()));
}

Tensor input(const std::vector<double>& values, int64_t t, int64_t c) { return Tensor::from_vector(values, {1, t, c}); }

// Row t of a (1, T, C) / (T, C) tensor.
std::vector<double> row(const Tensor& y, int64_t t, int64_t c) {
  std::vector<double> all = y.contiguous().to_vector<double>();
  return {all.begin() + t * c, all.begin() + (t + 1) * c};
}

TEST(MoeFFN, OneExpertEqualsTheDenseSwiGlu) {
  DecoderConfig cfg = moe_config(6, 1, 1, 8);
  cfg.moe.shared_experts = 0;
  MoeFFN moe(cfg, 0);
  moe.initialize(7, 0.5, 2);
  SwiGluFFN dense(cfg, 0);
  StateDict d;
  d["gate_proj.weight"] = moe.experts().gate_proj->weight().data().reshape({8, 6});
  d["up_proj.weight"] = moe.experts().up_proj->weight().data().reshape({8, 6});
  d["down_proj.weight"] = moe.experts().down_proj->weight().data().reshape({6, 8});
  dense.load_state_dict(d);
  Tensor x = testing::random_tensor({2, 3, 6}, 9);
  SequenceContext c1, c2;
  Variable xm(x, true), xd(x, true);
  Variable ym = moe.forward(xm, c1), yd = dense.forward(xd, c2);
  EXPECT_TENSOR_CLOSE(ym.data(), yd.data(), 1e-12, 1e-14);
  sum(ym).backward();
  sum(yd).backward();
  EXPECT_TENSOR_CLOSE(xm.grad(), xd.grad(), 1e-12, 1e-14);
  EXPECT_NEAR(c1.stat("layer0.moe.max_load"), 1.0, 1e-15);
  EXPECT_NEAR(c1.stat("layer0.moe.aux"), 1.0, 1e-15);  // E f P = 1 * 1 * 1
}

// Router = identity (C = E = 2), so the logits are the inputs.
TEST(MoeFFN, AuxAndZLossesMatchHandComputedValues) {
  DecoderConfig cfg = moe_config(2, 2, 1, 4);
  cfg.moe.aux_coef = 0.01;
  cfg.moe.z_coef = 0.001;
  MoeFFN moe(cfg, 3);
  moe.initialize(1, 0.5, 2);
  set(moe.router_proj().weight(), {1, 0, 0, 1});
  // token 0: logits (ln 3, 0) -> p = (3/4, 1/4), picks expert 0;
  // token 1: logits (0, 0)    -> p = (1/2, 1/2), tie -> expert 0.
  SequenceContext ctx;
  moe.forward(Variable(input({std::log(3.0), 0, 0, 0}, 2, 2)), ctx);
  // f = (2/2, 0/2) = (1, 0); P = ((3/4 + 1/2) / 2, (1/4 + 1/2) / 2) = (5/8, 3/8);
  // aux = E sum f P = 2 * 5/8 = 1.25.
  // lse = (ln 4, ln 2) -> z = ((2 ln 2)^2 + (ln 2)^2) / 2 = 2.5 ln^2 2 = 1.2011325347955035.
  const double ln2 = std::log(2.0);
  EXPECT_NEAR(ctx.stat("layer3.moe.aux"), 1.25, 1e-14);
  EXPECT_NEAR(ctx.stat("layer3.moe.z"), 2.5 * ln2 * ln2, 1e-14);
  EXPECT_NEAR(ctx.stat("layer3.moe.z"), 1.2011325347955035, 1e-14);
  EXPECT_NEAR(ctx.stat("layer3.moe.max_load"), 2.0, 1e-15);  // loads (2, 0), mean 1
  EXPECT_EQ(ctx.stat("layer3.moe.dropped"), 0.0);
  ASSERT_EQ(ctx.aux_losses.size(), 2u);
  EXPECT_NEAR(ctx.aux_losses[0].item(), 0.0125, 1e-15);
  EXPECT_NEAR(ctx.aux_losses[1].item(), 0.001 * 2.5 * ln2 * ln2, 1e-15);
  // Coefficients 0: no losses added, statistics still written.
  cfg.moe.aux_coef = 0;
  cfg.moe.z_coef = 0;
  MoeFFN quiet(cfg, 0);
  SequenceContext ctx2;
  quiet.forward(Variable(input({1, 0, 0, 1}, 2, 2)), ctx2);
  EXPECT_TRUE(ctx2.aux_losses.empty());
  EXPECT_EQ(ctx2.all_stats().count("layer0.moe.aux"), 1u);
}

TEST(MoeFFN, CapacityDropsTheLowestScoringSlots) {
  DecoderConfig cfg = moe_config(2, 2, 1, 4);
  cfg.moe.capacity_factor = 1.0;  // capacity ceil(4 * 1 * 1 / 2) = 2
  EXPECT_EQ(moe_capacity(4, 1, 2, 1.0), 2);
  EXPECT_EQ(moe_capacity(5, 2, 4, 1.25), 4);  // ceil(3.125)
  EXPECT_EQ(moe_capacity(5, 2, 4, 0.0), 0);
  MoeFFN moe(cfg, 0);
  moe.initialize(2, 0.5, 2);
  set(moe.router_proj().weight(), {1, 0, 0, 1});
  // Every token prefers expert 0 with logit margins 1, 3, 2, 4: tokens 3 and 1 are kept.
  Tensor x = input({1, 0, 3, 0, 2, 0, 4, 0}, 4, 2);
  SequenceContext ctx;
  Variable y = moe.forward(Variable(x), ctx);
  EXPECT_EQ(ctx.stat("layer0.moe.dropped"), 0.5);
  EXPECT_EQ(ctx.stat("layer0.moe.max_load"), 2.0);  // 4 slots on expert 0, mean 2
  for (int64_t t : {0, 2}) EXPECT_EQ(row(y.data(), t, 2), (std::vector<double>{0, 0})) << "token " << t;
  for (int64_t t : {1, 3}) {
    std::vector<double> xt = row(x, t, 2);
    double p0 = 1.0 / (1.0 + std::exp(-xt[0]));
    std::vector<double> e0 = moe.experts().forward(Variable(Tensor::from_vector(xt, {1, 2})), 0).data().to_vector<double>();
    std::vector<double> yt = row(y.data(), t, 2);
    for (int c = 0; c < 2; ++c) EXPECT_NEAR(yt[c], p0 * e0[c], 1e-14) << "token " << t;
    EXPECT_NE(yt[0], 0.0);
  }
  // The plan itself: ties in priority keep the lower slot; kept slots stay in token order.
  Tensor sel = Tensor::from_vector(std::vector<int64_t>{1, 0, 1, 0, 1, 0}, {3, 2});
  Tensor prio = Tensor::from_vector(std::vector<double>{0.5, 0.1, 0.5, 0.3, 0.9, 0.1}, {3, 2});
  MoeDispatch plan = plan_moe_dispatch(sel, prio, 3, 2);
  EXPECT_EQ(plan.load, (std::vector<int64_t>{3, 3, 0}));
  EXPECT_EQ(plan.kept, (std::vector<int64_t>{2, 2, 0}));
  EXPECT_EQ(plan.offsets, (std::vector<int64_t>{0, 2, 4, 4}));
  // Expert 0 has slots 1 (0.1), 3 (0.3), 5 (0.1): keeps 3 and slot 1 (tie with 5);
  // expert 1 has slots 0 (0.5), 2 (0.5), 4 (0.9): keeps 4 and slot 0 (tie with 2).
  EXPECT_EQ(plan.slot.to_vector<int64_t>(), (std::vector<int64_t>{1, 3, 0, 4}));
  EXPECT_EQ(plan.token.to_vector<int64_t>(), (std::vector<int64_t>{0, 1, 0, 2}));
  EXPECT_EQ(plan.dropped, 2);
}

// Expected output of token x under the given experts and weights.
std::vector<double> mix(const MoeFFN& moe, const std::vector<double>& x, const std::vector<int64_t>& experts,
                        const std::vector<double>& weights) {
  std::vector<double> out(x.size(), 0.0);
  for (size_t j = 0; j < experts.size(); ++j) {
    Variable xe(Tensor::from_vector(x, {1, static_cast<int64_t>(x.size())}));
    std::vector<double> ye = moe.experts().forward(xe, experts[j]).data().to_vector<double>();
    for (size_t c = 0; c < x.size(); ++c) out[c] += weights[j] * ye[c];
  }
  return out;
}

TEST(MoeFFN, RouterModesSelectAlikeButWeightDifferently) {
  DecoderConfig cfg = moe_config(4, 4, 2, 4);
  MoeFFN a(cfg, 0);
  cfg.moe.router = "softmax_topk";
  MoeFFN b(cfg, 0);
  a.initialize(3, 0.5, 2);
  b.initialize(3, 0.5, 2);
  set(a.router_proj().weight(), {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1});
  set(b.router_proj().weight(), {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1});
  std::vector<double> x = {0.3, 1.2, -0.5, 0.9};  // logits: top-2 = experts 1 (1.2), 3 (0.9)
  SequenceContext ca, cb;
  std::vector<double> ya = a.forward(Variable(input(x, 1, 4)), ca).data().to_vector<double>();
  std::vector<double> yb = b.forward(Variable(input(x, 1, 4)), cb).data().to_vector<double>();
  double z = 0;
  for (double v : x) z += std::exp(v);
  double p1 = std::exp(1.2) / z, p3 = std::exp(0.9) / z;
  std::vector<double> want_a = mix(a, x, {1, 3}, {p1 / (p1 + p3), p3 / (p1 + p3)});  // softmax over the two
  std::vector<double> want_b = mix(b, x, {1, 3}, {p1, p3});                          // not renormalized
  for (int c = 0; c < 4; ++c) {
    EXPECT_NEAR(ya[c], want_a[c], 1e-14);
    EXPECT_NEAR(yb[c], want_b[c], 1e-14);
  }
  EXPECT_GT(std::fabs(ya[0] - yb[0]), 1e-3);
  EXPECT_LT(p1 + p3, 1.0);
}

TEST(MoeFFN, BiasBalancingSteersSelectionNotWeights) {
  DecoderConfig cfg = moe_config(2, 2, 1, 4);
  cfg.moe.bias_balance = true;
  cfg.moe.bias_rate = 0.25;
  MoeFFN moe(cfg, 0);
  moe.initialize(4, 0.5, 2);
  set(moe.router_proj().weight(), {1, 0, 0, 1});
  ASSERT_TRUE(moe.router_bias().defined());
  EXPECT_FALSE(moe.router_bias().requires_grad());
  EXPECT_EQ(moe.state_dict().count("router_bias"), 1u);  // travels in checkpoints
  std::vector<double> x = {1.0, 0.0, 2.0, 0.0, 0.5, 0.0};  // every token prefers expert 0
  {
    SequenceContext ctx;
    NoGradGuard no_grad;  // evaluation: loads are not counted
    moe.forward(Variable(input(x, 3, 2)), ctx);
    EXPECT_EQ(moe.pending_load().to_vector<double>(), (std::vector<double>{0, 0}));
  }
  SequenceContext ctx;
  moe.forward(Variable(input(x, 3, 2)), ctx);
  EXPECT_EQ(moe.pending_load().to_vector<double>(), (std::vector<double>{3, 0}));
  moe.update_balance_bias();  // expert 0 overloaded: bias -u, expert 1: +u
  EXPECT_EQ(moe.router_bias().data().to_vector<double>(), (std::vector<double>{-0.25, 0.25}));
  EXPECT_EQ(moe.pending_load().to_vector<double>(), (std::vector<double>{0, 0}));
  moe.update_balance_bias();  // nothing seen: no change
  EXPECT_EQ(moe.router_bias().data().to_vector<double>(), (std::vector<double>{-0.25, 0.25}));
  // A large bias moves every token to expert 1; the weight is still the unbiased p_1.
  set(moe.router_bias(), {0.0, 10.0});
  SequenceContext ctx2;
  std::vector<double> y = moe.forward(Variable(input(x, 3, 2)), ctx2).data().to_vector<double>();
  EXPECT_EQ(moe.pending_load().to_vector<double>(), (std::vector<double>{0, 3}));
  for (int64_t t = 0; t < 3; ++t) {
    std::vector<double> xt = {x[t * 2], x[t * 2 + 1]};
    double p1 = 1.0 / (1.0 + std::exp(xt[0] - xt[1]));
    std::vector<double> want = mix(moe, xt, {1}, {p1});
    for (int c = 0; c < 2; ++c) EXPECT_NEAR(y[t * 2 + c], want[c], 1e-14) << "token " << t;
  }
  moe.update_balance_bias();
  EXPECT_EQ(moe.router_bias().data().to_vector<double>(), (std::vector<double>{0.25, 9.75}));
}

TEST(MoeFFN, BiasUpdatesMoveLoadsTowardBalance) {
  DecoderConfig cfg = moe_config(4, 4, 1, 4);
  cfg.moe.bias_balance = true;
  cfg.moe.bias_rate = 0.05;
  MoeFFN moe(cfg, 0);
  moe.initialize(5, 0.5, 2);
  set(moe.router_proj().weight(), {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1});
  std::vector<double> x;  // 8 tokens, all preferring expert 0 by different margins
  for (int t = 0; t < 8; ++t) x.insert(x.end(), {0.5 + 0.1 * t, 0.3 - 0.03 * t, 0.1 * (t % 3), 0.0});
  auto max_load = [&] {
    SequenceContext ctx;
    moe.forward(Variable(input(x, 8, 4)), ctx);
    return ctx.stat("layer0.moe.max_load");
  };
  double first = max_load(), last = first;
  moe.update_balance_bias();
  for (int step = 0; step < 40; ++step) {
    last = max_load();
    moe.update_balance_bias();
  }
  EXPECT_EQ(first, 4.0);  // 8 slots on expert 0, mean 2
  EXPECT_LE(last, 2.0) << "loads did not move toward balance";
  std::vector<double> bias = moe.router_bias().data().to_vector<double>();
  EXPECT_LT(bias[0], 0.0);  // the overloaded expert became less attractive
  // The bias survives a state_dict round trip (checkpoints).
  MoeFFN copy(cfg, 0);
  copy.load_state_dict(moe.state_dict());
  EXPECT_EQ(copy.router_bias().data().to_vector<double>(), bias);
}

TEST(MoeFFN, BadOptionsNameTheValues) {
  DecoderConfig cfg = moe_config(4, 4, 1, 4);
  cfg.moe.router = "topk_softmax";
  try {
    MoeFFN m(cfg, 0);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("topk = 1 needs"), std::string::npos) << e.what();
  }
  cfg = moe_config(4, 4, 5, 4);
  EXPECT_THROW(MoeFFN(cfg, 0), Error);
}

TEST(MoeFFN, NamesAttributesAndActiveParameters) {
  DecoderConfig cfg = moe_config(8, 4, 2, 0);
  cfg.ffn_hidden = 40;
  cfg.moe.hidden = 0;  // 40 / 2 = 20 -> 32
  cfg.moe.shared_experts = 2;
  MoeFFN moe(cfg, 0);
  EXPECT_EQ(moe.expert_hidden(), 32);
  std::vector<std::string> names;
  for (const auto& p : moe.named_parameters()) {
    names.push_back(p.name);
    bool expert = p.name.rfind("experts.", 0) == 0;
    EXPECT_EQ(p.attrs.expert, expert) << p.name;
    EXPECT_EQ(p.attrs.sharding == Sharding::expert, expert) << p.name;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"router_proj.weight", "experts.gate_proj.weight", "experts.up_proj.weight",
                                             "experts.down_proj.weight", "shared.gate_proj.weight",
                                             "shared.up_proj.weight", "shared.down_proj.weight"}));
  EXPECT_EQ(moe.experts().gate_proj->weight().shape(), (Shape{4, 32, 8}));
  EXPECT_EQ(moe.experts().down_proj->weight().shape(), (Shape{4, 8, 32}));
  EXPECT_EQ(moe.named_parameters()[4].var.shape(), (Shape{64, 8}));  // shared width 32 * 2
  EXPECT_EQ(moe.active_parameters(), 4 * 8 + 2 * 3 * 8 * 32 + 3 * 8 * 64);
}

}  // namespace
}  // namespace loom
