// sigmoid, silu, swiglu, sigmoid_gate: forward against the closed forms, saturation without
// overflow, gradients by finite differences (non-contiguous included), errors.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops_nn.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::non_contiguous;
using testing::random_tensor;
using testing::values;

Tensor map(const Tensor& x, double (*f)(double)) {
  std::vector<double> v = values(x);
  for (double& e : v) e = f(e);
  return Tensor::from_vector(v, x.shape());
}
double ref_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double ref_silu(double x) { return x / (1.0 + std::exp(-x)); }

TEST(Activation, ForwardMatchesClosedForms) {
  Tensor x = random_tensor({3, 17}, 1, DType::f64, 4.0);
  EXPECT_TENSOR_CLOSE(sigmoid(Variable(x)).data(), map(x, ref_sigmoid), 1e-14, 1e-15);
  EXPECT_TENSOR_CLOSE(silu(Variable(x)).data(), map(x, ref_silu), 1e-14, 1e-15);
  Tensor up = random_tensor({3, 17}, 2);
  std::vector<double> expected = values(map(x, ref_silu)), u = values(up);
  for (size_t i = 0; i < expected.size(); ++i) expected[i] *= u[i];
  EXPECT_TENSOR_CLOSE(swiglu(Variable(x), Variable(up)).data(), Tensor::from_vector(expected, {3, 17}), 1e-14, 1e-15);
}

TEST(Activation, Float32AndNonContiguousForward) {
  Tensor x = random_tensor({17, 3}, 3);
  EXPECT_TENSOR_CLOSE(silu(Variable(x.to(DType::f32))).data(), map(x, ref_silu), 1e-6, 1e-7);
  EXPECT_TENSOR_CLOSE(sigmoid(Variable(non_contiguous(x))).data(), map(x, ref_sigmoid), 1e-14, 1e-15);
}

TEST(Activation, SaturatesWithoutOverflow) {
  Tensor x = Tensor::from_vector<double>({-800.0, -40.0, 0.0, 40.0, 800.0}, {5});
  std::vector<double> s = values(sigmoid(Variable(x)).data());
  EXPECT_EQ(s[0], 0.0);
  EXPECT_EQ(s[2], 0.5);
  EXPECT_EQ(s[4], 1.0);
  std::vector<double> y = values(silu(Variable(x)).data());
  EXPECT_EQ(y[0], -0.0);
  EXPECT_EQ(y[4], 800.0);
  for (double v : y) EXPECT_TRUE(std::isfinite(v));
  // Gradients stay finite at the extremes too.
  Variable xv(x, true);
  silu(xv).backward(Tensor::ones({5}, DType::f64));
  for (double g : values(xv.grad())) EXPECT_TRUE(std::isfinite(g));
}

TEST(Activation, GradCheck) {
  auto sig = [](const std::vector<Variable>& in) { return std::vector<Variable>{sigmoid(in[0])}; };
  auto si = [](const std::vector<Variable>& in) { return std::vector<Variable>{silu(in[0])}; };
  auto sw = [](const std::vector<Variable>& in) { return std::vector<Variable>{swiglu(in[0], in[1])}; };
  EXPECT_GRADCHECK(sig, {random_tensor({3, 17}, 4, DType::f64, 3.0)});
  EXPECT_GRADCHECK(si, {random_tensor({65}, 5, DType::f64, 3.0)});
  EXPECT_GRADCHECK(sw, {random_tensor({17, 3}, 6, DType::f64, 3.0), random_tensor({17, 3}, 7)});
}

TEST(Activation, GradCheckNonContiguous) {
  auto sig = [](const std::vector<Variable>& in) { return std::vector<Variable>{sigmoid(in[0])}; };
  auto si = [](const std::vector<Variable>& in) { return std::vector<Variable>{silu(in[0])}; };
  auto sw = [](const std::vector<Variable>& in) { return std::vector<Variable>{swiglu(in[0], in[1])}; };
  EXPECT_GRADCHECK(sig, {non_contiguous(random_tensor({3, 17}, 8))});
  EXPECT_GRADCHECK(si, {random_tensor({17, 3}, 9).transpose(0, 1)});
  EXPECT_GRADCHECK(sw, {non_contiguous(random_tensor({1, 3, 17}, 10)), random_tensor({1, 3, 17}, 11)});
  EXPECT_GRADCHECK(sw, {random_tensor({3, 17}, 12), non_contiguous(random_tensor({3, 17}, 13))});
}

TEST(Activation, ThreadedPath) {
  Tensor x = random_tensor({33, 1025}, 14, DType::f64, 3.0), up = random_tensor({33, 1025}, 15);
  EXPECT_TENSOR_CLOSE(silu(Variable(x)).data(), map(x, ref_silu), 1e-14, 1e-15);
  auto sw = [](const std::vector<Variable>& in) { return std::vector<Variable>{swiglu(in[0], in[1])}; };
  EXPECT_TRUE(testing::spot_gradcheck(sw, {x, up}, 8, 16));
}

// x * sigmoid(z) with z per element or per last-dim row of x, against the closed form.
Tensor ref_gate(const Tensor& x, const Tensor& z) {
  std::vector<double> y = values(x), g = values(z);
  const size_t span = y.size() / g.size();
  for (size_t i = 0; i < y.size(); ++i) y[i] *= ref_sigmoid(g[i / span]);
  return Tensor::from_vector(y, x.shape());
}

TEST(SigmoidGate, ForwardMatchesTheClosedFormPerElementAndPerRow) {
  Tensor x = random_tensor({2, 3, 4, 5}, 20, DType::f64), ze = random_tensor({2, 3, 4, 5}, 21, DType::f64, 4.0);
  Tensor zh = random_tensor({2, 3, 4}, 22, DType::f64, 4.0);
  EXPECT_TENSOR_CLOSE(sigmoid_gate(Variable(x), Variable(ze)).data(), ref_gate(x, ze), 1e-14, 1e-15);
  EXPECT_TENSOR_CLOSE(sigmoid_gate(Variable(x), Variable(zh)).data(), ref_gate(x, zh), 1e-14, 1e-15);
  // Saturated gates stay finite and exact at the ends.
  Tensor zs = Tensor::from_vector<double>({-800.0, 800.0}, {2});
  std::vector<double> y = values(sigmoid_gate(Variable(Tensor::ones({2, 3}, DType::f64)), Variable(zs)).data());
  EXPECT_EQ(y, (std::vector<double>{0, 0, 0, 1, 1, 1}));
}

TEST(SigmoidGate, GradCheck) {
  auto gate = [](const std::vector<Variable>& in) { return std::vector<Variable>{sigmoid_gate(in[0], in[1])}; };
  EXPECT_GRADCHECK(gate, {random_tensor({3, 4, 5}, 23), random_tensor({3, 4, 5}, 24, DType::f64, 3.0)});
  EXPECT_GRADCHECK(gate, {random_tensor({3, 4, 5}, 25), random_tensor({3, 4}, 26, DType::f64, 3.0)});
  EXPECT_GRADCHECK(gate, {non_contiguous(random_tensor({2, 3, 17}, 27)), random_tensor({2, 3}, 28, DType::f64, 3.0)});
  EXPECT_GRADCHECK(gate, {random_tensor({4, 3}, 29), random_tensor({3, 4}, 30, DType::f64, 3.0).transpose(0, 1)});
  // Rows past the threaded-path threshold (one z per 2 elements).
  Tensor x = random_tensor({20000, 2}, 31), z = random_tensor({20000}, 32, DType::f64, 3.0);
  EXPECT_TENSOR_CLOSE(sigmoid_gate(Variable(x), Variable(z)).data(), ref_gate(x, z), 1e-14, 1e-15);
  EXPECT_TRUE(testing::spot_gradcheck(gate, {x, z}, 8, 16));
}

TEST(SigmoidGate, ErrorsNameTheValues) {
  Variable x(random_tensor({3, 4}, 1));
  EXPECT_ERROR_MENTIONS(sigmoid_gate(x, Variable(random_tensor({4}, 2))), {"sigmoid_gate", "(4,)", "(3, 4)"});
  EXPECT_ERROR_MENTIONS(sigmoid_gate(x, Variable(random_tensor({3, 4}, 3, DType::f32))), {"sigmoid_gate", "f64", "f32"});
  EXPECT_ERROR_MENTIONS(sigmoid_gate(x, Variable()), {"sigmoid_gate", "undefined"});
}

TEST(Activation, ErrorsNameTheValues) {
  Variable gate(random_tensor({3, 4}, 1)), up(random_tensor({3, 5}, 2));
  EXPECT_ERROR_MENTIONS(swiglu(gate, up), {"swiglu", "(3, 4)", "(3, 5)"});
  EXPECT_ERROR_MENTIONS(swiglu(gate, Variable(random_tensor({3, 4}, 3, DType::f32))), {"swiglu", "f64", "f32"});
  EXPECT_ERROR_MENTIONS(sigmoid(Variable(Tensor::zeros({2}, DType::i32))), {"sigmoid", "i32"});
  EXPECT_ERROR_MENTIONS(silu(Variable()), {"silu", "undefined"});
}

}  // namespace
}  // namespace loom
