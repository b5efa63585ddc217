// AdamW: two steps against the formulas written out by hand (f64), bias
// correction at step 1, weight decay only where the attributes ask for it,
// skipped parameters without gradients, the fp32-master path for bf16
// weights, checkpoint state round trip and its errors, and gradient
// accumulation over micro-batches (half-scaled losses == one full batch).
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "kernels/cpu/adamw.h"
#include "optim/adamw.h"
#include "tests/testing.h"

namespace loom {
namespace {

Parameter make_param(const std::string& name, const std::vector<double>& values, bool decay = true,
                     DType dtype = DType::f64) {
  Parameter p;
  p.name = name;
  Tensor t = Tensor::from_vector<double>(values, {static_cast<int64_t>(values.size())});
  p.var = Variable(dtype == DType::f64 ? t : t.to(dtype), true);
  p.attrs.weight_decay = decay;
  return p;
}

void set_grad(const Parameter& p, const std::vector<double>& values, DType dtype = DType::f64) {
  Tensor g = Tensor::from_vector<double>(values, p.var.shape());
  Variable v = p.var;
  v.set_grad(dtype == DType::f64 ? g : g.to(dtype));
}

std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

// Expects `fn` to throw loom::Error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning " << parts.front();
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
  }
}

AdamWConfig config(double wd = 0.1) {
  AdamWConfig c;
  c.beta1 = 0.9;
  c.beta2 = 0.999;
  c.eps = 1e-8;
  c.weight_decay = wd;
  return c;
}

TEST(AdamW, TwoStepsMatchTheFormulasWrittenOut) {
  const double lr1 = 0.01, lr2 = 0.005, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  const std::vector<double> p0 = {0.5, -1.0, 2.0};
  const std::vector<double> g1 = {0.1, -0.2, 0.3};
  const std::vector<double> g2 = {-0.05, 0.4, 0.0};
  Parameter p = make_param("w", p0);
  AdamW opt({p}, config(wd));
  set_grad(p, g1);
  opt.step(lr1);
  set_grad(p, g2);
  opt.step(lr2);
  EXPECT_EQ(opt.step_count(), 2);

  std::vector<double> got = values(p.var.data()), m_got = values(opt.exp_avg("w")), v_got = values(opt.exp_avg_sq("w"));
  for (size_t i = 0; i < p0.size(); ++i) {
    // step t = 1
    double m1 = (1 - b1) * g1[i];
    double v1 = (1 - b2) * g1[i] * g1[i];
    double mhat1 = m1 / (1 - b1);
    double vhat1 = v1 / (1 - b2);
    double p1 = p0[i] - lr1 * wd * p0[i] - lr1 * mhat1 / (std::sqrt(vhat1) + eps);
    // step t = 2
    double m2 = b1 * m1 + (1 - b1) * g2[i];
    double v2 = b2 * v1 + (1 - b2) * g2[i] * g2[i];
    double mhat2 = m2 / (1 - b1 * b1);
    double vhat2 = v2 / (1 - b2 * b2);
    double p2 = p1 - lr2 * wd * p1 - lr2 * mhat2 / (std::sqrt(vhat2) + eps);
    EXPECT_NEAR(got[i], p2, 1e-12 * std::abs(p2)) << "element " << i;
    EXPECT_NEAR(m_got[i], m2, 1e-15) << "element " << i;
    EXPECT_NEAR(v_got[i], v2, 1e-18) << "element " << i;
  }
  // Element 0 by the numbers: p1 = 0.5 * (1 - 0.001) - 0.01 * 0.1 / (0.1 + 1e-8).
  EXPECT_NEAR(got[0], 0.5 * 0.999 - 0.01 * 0.1 / (0.1 + 1e-8) -
                          0.005 * 0.1 * (0.5 * 0.999 - 0.01 * 0.1 / (0.1 + 1e-8)) -
                          0.005 * ((0.9 * 0.01 - 0.005) / 0.19) /
                              (std::sqrt((0.999 * 1e-5 + 0.001 * 0.0025) / (1 - 0.998001)) + 1e-8),
              1e-12);
}

TEST(AdamW, BiasCorrectionMakesTheFirstStepLrTimesSign) {
  // At t = 1, m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps)
  // whatever the size of g (no decay here).
  Parameter p = make_param("w", {1.0, 1.0, 1.0, 1.0}, false);
  AdamW opt({p}, config(0.0));
  set_grad(p, {1e-3, -5.0, 123.0, 0.0});
  opt.step(0.01);
  std::vector<double> got = values(p.var.data());
  const double g[] = {1e-3, -5.0, 123.0, 0.0};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(got[i], 1.0 - 0.01 * g[i] / (std::abs(g[i]) + 1e-8), 1e-15) << i;
  EXPECT_DOUBLE_EQ(got[3], 1.0);
}

TEST(AdamW, WeightDecayOnlyWhereTheAttributesAskForIt) {
  // Zero gradients leave only the decay: p * (1 - lr * wd) for decayed params.
  Parameter decayed = make_param("decayed", {2.0, -4.0});
  Parameter plain = make_param("plain", {2.0, -4.0}, false);
  AdamW opt({decayed, plain}, config(0.5));
  set_grad(decayed, {0.0, 0.0});
  set_grad(plain, {0.0, 0.0});
  opt.step(0.1);
  EXPECT_EQ(values(decayed.var.data()), (std::vector<double>{2.0 * (1 - 0.1 * 0.5), -4.0 * (1 - 0.1 * 0.5)}));
  EXPECT_EQ(values(plain.var.data()), (std::vector<double>{2.0, -4.0}));
  // With gradients: the two differ exactly by the decay term lr * wd * p.
  set_grad(decayed, {0.3, 0.3});
  set_grad(plain, {0.3, 0.3});
  std::vector<double> before = values(decayed.var.data());
  Parameter twin = make_param("twin", before, false);
  AdamW twin_opt({twin}, config(0.5));
  twin_opt.load_state_dict({{"twin.exp_avg", opt.exp_avg("decayed")},
                            {"twin.exp_avg_sq", opt.exp_avg_sq("decayed")},
                            {"step", Tensor::scalar(1, DType::i64)}});
  set_grad(twin, {0.3, 0.3});
  opt.step(0.1);
  twin_opt.step(0.1);
  std::vector<double> a = values(decayed.var.data()), b = values(twin.var.data());
  for (int i = 0; i < 2; ++i) EXPECT_NEAR(a[i], b[i] - 0.1 * 0.5 * before[i], 1e-15);
}

TEST(AdamW, ParametersWithoutGradientsAreSkipped) {
  Parameter used = make_param("used", {1.0});
  Parameter unused = make_param("unused", {1.0});
  AdamW opt({used, unused}, config());
  set_grad(used, {0.5});
  opt.step(0.1);
  EXPECT_EQ(values(unused.var.data()), std::vector<double>{1.0});  // not even decayed
  EXPECT_EQ(values(opt.exp_avg("unused")), std::vector<double>{0.0});
  EXPECT_NE(values(used.var.data())[0], 1.0);
  EXPECT_EQ(opt.step_count(), 1);
  opt.zero_grad();
  EXPECT_FALSE(used.var.grad().defined());
}

TEST(AdamW, F32ParametersAreTheirOwnMaster) {
  Parameter p = make_param("w", {1.0, 2.0}, true, DType::f32);
  AdamW opt({p}, config());
  EXPECT_FALSE(opt.has_separate_master("w"));
  EXPECT_TRUE(opt.master("w").shares_storage(p.var.data()));
  EXPECT_EQ(opt.exp_avg("w").dtype(), DType::f32);
  EXPECT_EQ(opt.state_dict().count("w.master"), 0u);
}

TEST(AdamW, Bf16WeightsKeepAnF32MasterAndAreItsRounding) {
  std::vector<double> init = {0.1234567, -3.3333, 7.77, 1e-3, 250.5};
  Parameter p = make_param("w", init, true, DType::bf16);
  // The reference: the same start as an f32 parameter (which is its own master).
  Parameter ref = make_param("w", values(p.var.data()), true, DType::f32);
  AdamW opt({p}, config());
  AdamW ref_opt({ref}, config());
  ASSERT_TRUE(opt.has_separate_master("w"));
  EXPECT_EQ(opt.master("w").dtype(), DType::f32);
  EXPECT_EQ(opt.exp_avg("w").dtype(), DType::f32);
  EXPECT_EQ(opt.exp_avg_sq("w").dtype(), DType::f32);
  for (int step = 0; step < 3; ++step) {
    std::vector<double> g = {0.01 * step - 0.02, 0.5, -1e-4, 3.0, -0.25};
    set_grad(p, g, DType::f32);  // fp32 gradient buffers
    set_grad(ref, g, DType::f32);
    opt.step(1e-3);
    ref_opt.step(1e-3);
    EXPECT_EQ(p.var.dtype(), DType::bf16);
    EXPECT_EQ(opt.master("w").dtype(), DType::f32);
    // The master follows exactly the f32 trajectory; the weights are its rounding.
    EXPECT_TENSOR_CLOSE(opt.master("w"), ref.var.data(), 0, 0);
    EXPECT_TENSOR_CLOSE(p.var.data(), opt.master("w").to(DType::bf16), 0, 0);
  }
  // Tiny updates that bf16 cannot represent still accumulate in the master.
  EXPECT_NE(values(opt.master("w")), values(p.var.data()));
  // bf16 gradients are accepted too.
  set_grad(p, {1, 1, 1, 1, 1}, DType::bf16);
  opt.step(1e-3);
  EXPECT_TENSOR_CLOSE(p.var.data(), opt.master("w").to(DType::bf16), 0, 0);
}

TEST(AdamW, ReloadMastersFromParamsAfterLoadingWeights) {
  Parameter p = make_param("w", {1.0, 2.0}, true, DType::bf16);
  AdamW opt({p}, config());
  Tensor data = p.var.data();
  data.copy_(Tensor::from_vector<double>({5.0, 6.0}, {2}));
  EXPECT_EQ(values(opt.master("w")), (std::vector<double>{1.0, 2.0}));
  opt.reload_masters_from_params();
  EXPECT_EQ(values(opt.master("w")), (std::vector<double>{5.0, 6.0}));
}

// Two parameters (one bf16 with a master, one f64 without), with a gradient per step.
struct TwoParamRun {
  Parameter a = make_param("blocks.0.weight", {0.3, -0.7, 1.1}, true, DType::bf16);
  Parameter b = make_param("blocks.0.norm", {1.0, 0.9}, false);
  AdamW opt{{a, b}, config()};
  void step(int t) {
    set_grad(a, {0.1 * t, -0.2, 0.05 * t * t}, DType::f32);
    set_grad(b, {-0.3, 0.01 * t});
    opt.step(1e-2 / t);
  }
};

TEST(AdamW, StateDictRoundTripContinuesLikeAnUninterruptedRun) {
  TwoParamRun uninterrupted;
  for (int t = 1; t <= 4; ++t) uninterrupted.step(t);

  TwoParamRun first;
  for (int t = 1; t <= 2; ++t) first.step(t);
  StateDict saved;
  for (const auto& [k, v] : first.opt.state_dict()) saved[k] = v.clone();
  EXPECT_EQ(saved.size(), 6u);
  EXPECT_EQ(saved.count("blocks.0.weight.master"), 1u);
  EXPECT_EQ(saved.count("blocks.0.norm.master"), 0u);
  EXPECT_EQ(saved.at("step").item(), 2.0);
  Tensor saved_b = first.b.var.data().clone();

  TwoParamRun resumed;  // fresh weights, fresh state; the bf16 weight comes from the master
  Tensor b_data = resumed.b.var.data();
  b_data.copy_(saved_b);
  resumed.opt.load_state_dict(saved);
  EXPECT_EQ(resumed.opt.step_count(), 2);
  EXPECT_TENSOR_CLOSE(resumed.a.var.data(), first.a.var.data(), 0, 0);
  for (int t = 3; t <= 4; ++t) resumed.step(t);
  EXPECT_TENSOR_CLOSE(resumed.a.var.data(), uninterrupted.a.var.data(), 0, 0);
  EXPECT_TENSOR_CLOSE(resumed.b.var.data(), uninterrupted.b.var.data(), 0, 0);
  for (const auto& [k, v] : uninterrupted.opt.state_dict())
    EXPECT_TENSOR_CLOSE(resumed.opt.state_dict().at(k), v, 0, 0) << k;
}

TEST(AdamW, LoadStateDictNamesEveryBadKey) {
  TwoParamRun run;
  StateDict bad = run.opt.state_dict();
  bad.erase("blocks.0.norm.exp_avg");
  bad.erase("step");
  bad["blocks.0.norm.master"] = Tensor::zeros({2});
  bad["blocks.0.weight.exp_avg_sq"] = Tensor::zeros({4});
  Tensor before = run.opt.exp_avg("blocks.0.weight").clone();
  bad["blocks.0.weight.exp_avg"] = Tensor::ones({3});
  expect_error([&] { run.opt.load_state_dict(bad); },
               {"missing [blocks.0.norm.exp_avg, step]", "unexpected [blocks.0.norm.master]",
                "wrong shape [blocks.0.weight.exp_avg_sq (checkpoint (4,), expected (3,))]"});
  EXPECT_TENSOR_CLOSE(run.opt.exp_avg("blocks.0.weight"), before, 0, 0);  // nothing copied
  StateDict bad_step = run.opt.state_dict();
  bad_step["step"] = Tensor::scalar(-1.0, DType::f64);
  expect_error([&] { run.opt.load_state_dict(bad_step); }, {"step -1"});
}

TEST(AdamW, ConstructionAndStepErrors) {
  Parameter p = make_param("w", {1.0});
  Parameter q = make_param("w", {2.0});
  expect_error([&] { AdamW({p, q}, config()); }, {"'w' appears twice"});
  Parameter alias = p;
  alias.name = "tied";
  expect_error([&] { AdamW({p, alias}, config()); }, {"'w' and 'tied' are the same Variable"});
  AdamWConfig c = config();
  c.beta2 = 1.0;
  expect_error([&] { AdamW({p}, c); }, {"beta2 1"});
  AdamW opt({p}, config());
  set_grad(p, {1.0});
  expect_error([&] { opt.step(-1.0); }, {"lr -1"});
  Variable v = p.var;
  v.set_data(Tensor::zeros({2}, DType::f64));  // replaced behind the optimizer's back
  expect_error([&] { opt.step(0.1); }, {"gradient of 'w' has shape (1,), the parameter (2,)"});
  v.set_data(Tensor::zeros({1}, DType::bf16));
  expect_error([&] { opt.step(0.1); }, {"parameter 'w' is now bf16", "built for f64"});
  expect_error([&] { opt.master("nope"); }, {"no parameter named 'nope'"});
}

TEST(AdamW, KernelOnFlatSpansOfALargeTensorMatchesElementwise) {
  // Large enough to take the threaded path; checks the span kernel directly.
  const int64_t n = (1 << 16) + 3;
  Tensor p = testing::random_tensor({n}, 1, DType::f32);
  Tensor g = testing::random_tensor({n}, 2, DType::f32);
  Tensor m = Tensor::zeros({n}), v = Tensor::zeros({n}), compute = Tensor::zeros({n}, DType::bf16);
  Tensor p0 = p.clone();
  cpu::AdamWScalars s;
  s.lr = 0.1;
  s.weight_decay = 0.01;
  cpu::adamw_step(p, m, v, compute, g, s, Stream::default_for(Device::cpu()));
  std::vector<float> pv = p.to_vector<float>(), p0v = p0.to_vector<float>(), gv = g.to_vector<float>();
  for (int64_t i : {int64_t{0}, n / 2, n - 1}) {
    double expected = p0v[i] * (1 - 0.1 * 0.01) - 0.1 * gv[i] / (std::abs(gv[i]) + 1e-8);
    EXPECT_NEAR(pv[i], expected, 1e-6 * (1 + std::abs(expected))) << i;
  }
  EXPECT_TENSOR_CLOSE(compute, p.to(DType::bf16), 0, 0);
}

TEST(AdamW, MicroBatchesWithHalfScaledLossesGiveTheFullBatchUpdate) {
  // Model: y = x * w + b (broadcast over rows), loss = mean((y - target)^2).
  Tensor x = testing::random_tensor({4, 3}, 11);       // (B, C)
  Tensor target = testing::random_tensor({4, 3}, 12);  // (B, C)
  auto build = [](const std::string& tag) {
    Parameter w = make_param(tag + "w", {0.5, -0.25, 1.5});
    Parameter b = make_param(tag + "b", {0.1, 0.2, -0.3}, false);
    return std::vector<Parameter>{w, b};
  };
  auto loss_of = [](const std::vector<Parameter>& ps, const Tensor& xs, const Tensor& ts, double scale_by) {
    Variable y = add(mul(Variable(xs), ps[0].var), ps[1].var);  // (B, C)
    Variable diff = sub(y, Variable(ts));
    return scale(mean(mul(diff, diff)), scale_by);
  };
  std::vector<Parameter> full = build("full."), micro = build("micro.");
  AdamW full_opt(full, config()), micro_opt(micro, config());

  loss_of(full, x, target, 1.0).backward();
  for (int k = 0; k < 2; ++k) {  // grad_accum = 2: each micro-batch loss scaled by 1/2
    Tensor xs = x.slice(0, 2 * k, 2 * k + 2).contiguous(), ts = target.slice(0, 2 * k, 2 * k + 2).contiguous();
    loss_of(micro, xs, ts, 0.5).backward();
  }
  for (int i = 0; i < 2; ++i) EXPECT_TENSOR_CLOSE(micro[i].var.grad(), full[i].var.grad(), 1e-12, 1e-14);
  full_opt.step(0.01);
  micro_opt.step(0.01);
  for (int i = 0; i < 2; ++i) EXPECT_TENSOR_CLOSE(micro[i].var.data(), full[i].var.data(), 1e-12, 1e-14);
}

}  // namespace
}  // namespace loom
