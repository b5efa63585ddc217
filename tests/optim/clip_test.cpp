// Gradient clipping: the global norm in f64 against hand values, scaling when
// above max_norm, no-op below or when disabled, NaN/Inf handling, and the
// sharded-sum path through a fake communicator that stands in for the other
// ranks.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "optim/clip.h"
#include "tests/testing.h"

namespace loom {
namespace {

Parameter param_with_grad(const std::string& name, const std::vector<double>& grad, DType dtype = DType::f64,
                          Sharding sharding = Sharding::replicated) {
  Parameter p;
  p.name = name;
  Shape shape = {static_cast<int64_t>(grad.size())};
  p.var = Variable(Tensor::zeros(shape, dtype), true);
  p.attrs.sharding = sharding;
  p.attrs.expert = sharding == Sharding::expert;
  Tensor g = Tensor::from_vector<double>(grad, shape);
  p.var.set_grad(dtype == DType::f64 ? g : g.to(dtype));
  return p;
}

std::vector<double> grad_values(const Parameter& p) { return p.var.grad().to_vector<double>(); }

// Plays the other ranks: all_reduce adds `others` (their sum) to this rank's
// value and records what this rank contributed.
class FakeCommunicator : public Communicator {
 public:
  explicit FakeCommunicator(double others) : others_(others) {}
  int rank() const override { return 0; }
  int size() const override { return 4; }
  const std::string& name() const override { return name_; }
  void all_reduce(Tensor& tensor, ReduceOp op, Stream&) override {
    EXPECT_EQ(op, ReduceOp::sum);
    EXPECT_EQ(tensor.dtype(), DType::f64);
    EXPECT_EQ(tensor.numel(), 1);
    contributions.push_back(tensor.item());
    tensor.fill_(tensor.item() + others_);
  }
  void all_gather(Tensor&, const Tensor&, Stream&) override { unexpected("all_gather"); }
  void reduce_scatter(Tensor&, const Tensor&, ReduceOp, Stream&) override { unexpected("reduce_scatter"); }
  void broadcast(Tensor&, int, Stream&) override { unexpected("broadcast"); }
  void send(const Tensor&, int, Stream&) override { unexpected("send"); }
  void recv(Tensor&, int, Stream&) override { unexpected("recv"); }
  void send_recv(const Tensor&, int, Tensor&, int, Stream&) override { unexpected("send_recv"); }
  void all_to_all(Tensor&, const Tensor&, Stream&) override { unexpected("all_to_all"); }
  void barrier() override { unexpected("barrier"); }

  std::vector<double> contributions;

 private:
  static void unexpected(const char* what) { ADD_FAILURE() << "unexpected collective " << what; }
  double others_;
  std::string name_ = "ep";
};

TEST(ClipGradNorm, NormIsTheF64GlobalNormOverAllGradients) {
  std::vector<Parameter> ps = {param_with_grad("a", {3, 4}), param_with_grad("b", {12})};
  EXPECT_DOUBLE_EQ(grad_norm(ps), 13.0);
  // Parameters without a gradient are left out.
  Parameter none;
  none.name = "none";
  none.var = Variable(Tensor::ones({5}, DType::f64), true);
  ps.push_back(none);
  EXPECT_DOUBLE_EQ(grad_norm(ps), 13.0);
  EXPECT_EQ(grad_norm({}), 0.0);
}

TEST(ClipGradNorm, F32GradientsAreAccumulatedInF64) {
  // 1e7^2 + 1 is exact in f64 but rounds to 1e14 in f32.
  std::vector<Parameter> ps = {param_with_grad("a", {1e7, 1.0}, DType::f32)};
  EXPECT_EQ(grad_norm(ps), std::sqrt(1e14 + 1.0));
  // Large, odd-sized gradients (threaded, blocked sum) against a plain f64 loop.
  Tensor big = testing::random_tensor({100003}, 5, DType::f32);
  Parameter p;
  p.name = "big";
  p.var = Variable(Tensor::zeros({100003}), true);
  p.var.set_grad(big);
  double expected = 0.0;
  for (float v : big.to_vector<float>()) expected += static_cast<double>(v) * static_cast<double>(v);
  EXPECT_NEAR(grad_norm({p}), std::sqrt(expected), 1e-12 * std::sqrt(expected));
  // bf16 gradients too.
  EXPECT_DOUBLE_EQ(grad_norm({param_with_grad("h", {3, 4}, DType::bf16)}), 5.0);
}

TEST(ClipGradNorm, ScalesEveryGradientWhenAboveMaxNorm) {
  std::vector<Parameter> ps = {param_with_grad("a", {3, 4}), param_with_grad("b", {12}, DType::f32),
                               param_with_grad("c", {-13}, DType::bf16)};
  double norm = std::sqrt(9.0 + 16 + 144 + 169);  // 18.38...
  double returned = clip_grad_norm(ps, 1.0);
  EXPECT_DOUBLE_EQ(returned, norm);  // the norm before clipping
  double factor = 1.0 / (norm + 1e-6);
  std::vector<double> a = grad_values(ps[0]);
  EXPECT_DOUBLE_EQ(a[0], 3 * factor);
  EXPECT_DOUBLE_EQ(a[1], 4 * factor);
  EXPECT_NEAR(grad_values(ps[1])[0], 12 * factor, 1e-6);
  EXPECT_NEAR(grad_values(ps[2])[0], -13 * factor, 13 * factor / 128);  // bf16 rounding
  EXPECT_LT(grad_norm(ps), 1.0 + 1e-2);
}

TEST(ClipGradNorm, NoOpBelowMaxNormOrWhenDisabled) {
  std::vector<Parameter> ps = {param_with_grad("a", {3, 4})};
  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, 5.0), 5.0);  // equal: not above
  EXPECT_EQ(grad_values(ps[0]), (std::vector<double>{3, 4}));
  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, 100.0), 5.0);
  EXPECT_EQ(grad_values(ps[0]), (std::vector<double>{3, 4}));
  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, 0.0), 5.0);  // disabled, still returns the norm
  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, -1.0), 5.0);
  EXPECT_EQ(grad_values(ps[0]), (std::vector<double>{3, 4}));
}

TEST(ClipGradNorm, NonFiniteNormIsReturnedAndNothingIsScaled) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  std::vector<Parameter> ps = {param_with_grad("a", {3, 4}), param_with_grad("b", {nan, 1.0}, DType::f32)};
  EXPECT_TRUE(std::isnan(clip_grad_norm(ps, 1.0)));
  EXPECT_EQ(grad_values(ps[0]), (std::vector<double>{3, 4}));
  EXPECT_FALSE(grads_finite(ps));
  std::vector<Parameter> qs = {param_with_grad("a", {3, 4}), param_with_grad("b", {-inf})};
  EXPECT_TRUE(std::isinf(clip_grad_norm(qs, 1.0)));
  EXPECT_EQ(grad_values(qs[0]), (std::vector<double>{3, 4}));
  EXPECT_FALSE(grads_finite(qs));
  EXPECT_TRUE(grads_finite({param_with_grad("a", {3, 4}), param_with_grad("h", {1e30}, DType::f32)}));
  // A huge but finite f64 gradient: the norm overflows, the gradients are finite.
  std::vector<Parameter> huge = {param_with_grad("a", {1e200})};
  EXPECT_TRUE(grads_finite(huge));
  EXPECT_TRUE(std::isinf(grad_norm(huge)));
}

TEST(ClipGradNorm, ShardedGradientsAreSummedOverTheCommunicator) {
  // Replicated: 3^2 + 4^2 = 25, counted once. Expert-sharded: this rank holds
  // 12^2 = 144, the other ranks 100 together.
  std::vector<Parameter> ps = {param_with_grad("dense", {3, 4}),
                               param_with_grad("experts.0.w", {12}, DType::f64, Sharding::expert)};
  FakeCommunicator comm(100.0);
  double norm = clip_grad_norm(ps, 0.0, &comm);
  EXPECT_DOUBLE_EQ(norm, std::sqrt(25.0 + 144.0 + 100.0));
  ASSERT_EQ(comm.contributions.size(), 1u);
  EXPECT_DOUBLE_EQ(comm.contributions[0], 144.0);  // only the sharded part travels
  // Clipping uses the global norm.
  clip_grad_norm(ps, 1.0, &comm);
  EXPECT_DOUBLE_EQ(grad_values(ps[0])[0], 3.0 / (norm + 1e-6));
  EXPECT_DOUBLE_EQ(grad_values(ps[1])[0], 12.0 / (norm + 1e-6));
  // A rank without sharded gradients still joins the collective.
  FakeCommunicator other(44.0);
  EXPECT_DOUBLE_EQ(grad_norm({param_with_grad("dense", {3, 4})}, &other), std::sqrt(25.0 + 44.0));
  EXPECT_EQ(other.contributions, std::vector<double>{0.0});
  // Without a communicator the sharded part is this rank's alone.
  EXPECT_DOUBLE_EQ(grad_norm({param_with_grad("e", {12}, DType::f64, Sharding::expert)}), 12.0);
}

TEST(ClipGradNorm, GradsFiniteAgreesAcrossRanks) {
  std::vector<Parameter> ps = {param_with_grad("a", {3, 4})};
  FakeCommunicator healthy(0.0), sick(1.0);  // another rank saw one non-finite value
  EXPECT_TRUE(grads_finite(ps, &healthy));
  EXPECT_FALSE(grads_finite(ps, &sick));
  EXPECT_EQ(sick.contributions, std::vector<double>{0.0});
}

}  // namespace
}  // namespace loom
