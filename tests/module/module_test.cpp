// Modules: names and attributes, state_dict round trip and its errors,
// name-keyed initialization, and a 2-layer MLP that fits a regression.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/module.h"
#include "framework/ops.h"
#include "tests/testing.h"

namespace loom {
namespace {

class TwoLayer : public Module {
 public:
  TwoLayer(int64_t in, int64_t hidden, int64_t out, DType dtype = DType::f32) {
    InitSpec out_init;
    out_init.kind = InitSpec::Kind::scaled_normal;
    norm = register_module("norm", std::make_shared<RMSNorm>(in, 1e-6, dtype));
    fc1 = register_module("fc1", std::make_shared<Linear>(in, hidden, true, InitSpec{}, dtype));
    fc2 = register_module("fc2", std::make_shared<Linear>(hidden, out, true, out_init, dtype));
  }
  Variable forward(const Variable& x) const { return fc2->forward(silu(fc1->forward(norm->forward(x)))); }
  std::shared_ptr<RMSNorm> norm;
  std::shared_ptr<Linear> fc1, fc2;
};

TEST(Module, NamedParametersAndAttributes) {
  TwoLayer m(3, 5, 2);
  std::vector<Parameter> ps = m.named_parameters();
  std::vector<std::string> names;
  for (const auto& p : ps) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"norm.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  EXPECT_EQ(m.num_parameters(), 3 + 15 + 5 + 10 + 2);
  EXPECT_FALSE(ps[0].attrs.weight_decay);  // norm
  EXPECT_TRUE(ps[1].attrs.weight_decay);   // weight
  EXPECT_FALSE(ps[2].attrs.weight_decay);  // bias
  EXPECT_EQ(ps[3].attrs.init.kind, InitSpec::Kind::scaled_normal);
  EXPECT_EQ(ps[1].var.shape(), (Shape{5, 3}));
  Embedding e(11, 4);
  EXPECT_FALSE(e.named_parameters()[0].attrs.weight_decay);
}

TEST(Module, StateDictRoundTripAndErrorsNameEveryProblem) {
  TwoLayer a(3, 5, 2), b(3, 5, 2);
  a.initialize(1, 0.5, 2);
  b.initialize(2, 0.5, 2);
  b.load_state_dict(a.state_dict());
  for (const auto& [name, t] : a.state_dict()) EXPECT_TENSOR_CLOSE(b.state_dict().at(name), t, 0, 0);

  StateDict bad = a.state_dict();
  bad.erase("fc1.bias");
  bad["fc3.weight"] = Tensor::zeros({1});
  bad["fc2.weight"] = Tensor::zeros({2, 4});
  try {
    b.load_state_dict(bad);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("missing [fc1.bias]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("unexpected [fc3.weight]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("fc2.weight (checkpoint (2, 4), model (2, 5))"), std::string::npos) << msg;
  }
  // Non-strict loading tolerates missing/unexpected names, never wrong shapes.
  bad.erase("fc2.weight");
  EXPECT_NO_THROW(b.load_state_dict(bad, /*strict=*/false));
}

TEST(Module, InitializationIsKeyedByNameAndFollowsTheSpec) {
  TwoLayer a(64, 96, 64), b(64, 96, 64);
  a.initialize(7, 0.02, 4);
  b.initialize(7, 0.02, 4);
  EXPECT_TENSOR_CLOSE(a.fc1->weight().data(), b.fc1->weight().data(), 0, 0);
  // A module holding a parameter of the same full name gets the same values.
  class Holder : public Module {
   public:
    Holder() { fc1 = register_module("fc1", std::make_shared<Linear>(64, 96, false)); }
    std::shared_ptr<Linear> fc1;
  } h;
  h.initialize(7, 0.02, 4);
  EXPECT_TENSOR_CLOSE(h.fc1->weight().data(), a.fc1->weight().data(), 0, 0);
  // Statistics: fc1 ~ N(0, 0.02^2); fc2 scaled by 1/sqrt(2 * 4); biases 0; norm 1.
  auto stddev = [](const Tensor& t) {
    double s = 0, n = 0;
    for (double v : t.to_vector<double>()) s += v * v, n += 1;
    return std::sqrt(s / n);
  };
  EXPECT_NEAR(stddev(a.fc1->weight().data()), 0.02, 0.001);
  EXPECT_NEAR(stddev(a.fc2->weight().data()), 0.02 / std::sqrt(8.0), 0.0005);
  EXPECT_EQ(stddev(a.fc1->bias().data()), 0.0);
  EXPECT_EQ(a.norm->weight().data().to_vector<float>()[0], 1.0f);
  EXPECT_THROW(a.initialize(7, 0.0, 4), Error);
}

TEST(Module, DuplicateOrBadNamesAreRejected) {
  class Dup : public Module {
   public:
    explicit Dup(const std::string& second) {
      register_parameter("w", Tensor::zeros({1}));
      register_parameter(second, Tensor::zeros({1}));
    }
  };
  EXPECT_THROW(Dup("w"), Error);
  EXPECT_THROW(Dup("a.b"), Error);
  EXPECT_NO_THROW(Dup("v"));
  EXPECT_THROW(Linear(0, 3), Error);
}

TEST(Module, TwoLayerMlpFitsARegression) {
  // Targets from a fixed random teacher; plain full-batch gradient descent.
  const int64_t n = 256, in = 8, hidden = 32, out = 2;
  Tensor x = testing::random_tensor({n, in}, 11, DType::f32);
  TwoLayer teacher(in, 16, out);
  teacher.initialize(99, 0.5, 1);
  Tensor y;
  {
    NoGradGuard no_grad;
    y = teacher.forward(Variable(x)).data();
  }
  TwoLayer model(in, hidden, out);
  model.initialize(5, 0.2, 1);
  auto loss_of = [&] {
    Variable diff = sub(model.forward(Variable(x)), Variable(y));  // (n, out)
    return mean(mul(diff, diff));
  };
  double first = 0, last = 0;
  const double lr = 0.1;
  for (int step = 0; step < 400; ++step) {
    model.zero_grad();
    Variable loss = loss_of();
    if (step == 0) first = loss.item();
    last = loss.item();
    loss.backward();
    for (auto& p : model.named_parameters()) {
      Tensor w = p.var.data();
      std::vector<float> wv = w.to_vector<float>(), gv = p.var.grad().to_vector<float>();
      for (size_t i = 0; i < wv.size(); ++i) wv[i] -= static_cast<float>(lr) * gv[i];
      w.copy_(Tensor::from_vector<float>(wv, w.shape()));
    }
  }
  EXPECT_LT(last, first / 10) << "loss " << first << " -> " << last;
}

}  // namespace
}  // namespace loom
