// add/sub/mul/div/scale: values against plain loops (with broadcasting),
// finite-difference gradients on odd and broadcast shapes, errors that name
// the shapes and dtypes.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops_tensor.h"
#include "tests/ops_tensor/reference.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::non_contiguous;
using testing::random_tensor;
using testing::reference_binary;

// Random values with |x| >= 0.5, safe as divisors in finite differences.
Tensor away_from_zero(const Shape& shape, uint64_t seed) {
  std::vector<double> v = random_tensor(shape, seed).to_vector<double>();
  for (double& x : v) x = x >= 0 ? x + 0.5 : x - 0.5;
  return Tensor::from_vector(v, shape);
}

TEST(Arithmetic, ValuesMatchLoopsUnderBroadcasting) {
  Tensor a = random_tensor({3, 1, 17}, 1), b = away_from_zero({17}, 2);
  Variable va(a), vb(b);
  EXPECT_TENSOR_CLOSE(add(va, vb).data(), reference_binary(a, b, [](double x, double y) { return x + y; }), 1e-15, 0);
  EXPECT_TENSOR_CLOSE(sub(va, vb).data(), reference_binary(a, b, [](double x, double y) { return x - y; }), 1e-15, 0);
  EXPECT_TENSOR_CLOSE(mul(va, vb).data(), reference_binary(a, b, [](double x, double y) { return x * y; }), 1e-15, 0);
  EXPECT_TENSOR_CLOSE(div(va, vb).data(), reference_binary(a, b, [](double x, double y) { return x / y; }), 1e-15, 0);
  // Both operands broadcast: (3, 1) and (1, 5) -> (3, 5); operators forward to the functions.
  Tensor c = random_tensor({3, 1}, 3), d = random_tensor({1, 5}, 4);
  Variable vc(c), vd(d);
  EXPECT_EQ((vc + vd).shape(), (Shape{3, 5}));
  EXPECT_TENSOR_CLOSE((vc + vd).data(), reference_binary(c, d, [](double x, double y) { return x + y; }), 0, 0);
  EXPECT_TENSOR_CLOSE((vc - vd).data(), reference_binary(c, d, [](double x, double y) { return x - y; }), 0, 0);
  EXPECT_TENSOR_CLOSE((vc * vd).data(), reference_binary(c, d, [](double x, double y) { return x * y; }), 0, 0);
}

TEST(Arithmetic, KnownValuesInF32AndNonContiguousInputs) {
  Variable a(Tensor::from_vector<float>({1, 2, 3, 4}, {2, 2})), b(Tensor::from_vector<float>({10, 20}, {2}));
  EXPECT_EQ(add(a, b).data().to_vector<float>(), (std::vector<float>{11, 22, 13, 24}));
  EXPECT_EQ(div(a, b).dtype(), DType::f32);
  EXPECT_EQ(scale(a, -2.0).data().to_vector<float>(), (std::vector<float>{-2, -4, -6, -8}));
  Tensor x = random_tensor({17, 3}, 5), y = random_tensor({17, 3}, 6);
  Variable nx(non_contiguous(x)), ny(y.transpose(0, 1).contiguous().transpose(0, 1));  // column-major
  EXPECT_TENSOR_CLOSE(mul(nx, ny).data(), reference_binary(x, y, [](double p, double q) { return p * q; }), 0, 0);
}

TEST(Arithmetic, AddAndSubGradients) {
  testing::GradCheckOptions opts;
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{add(in[0], in[1])}; },
                   {random_tensor({3, 1, 17}, 1), random_tensor({17}, 2)}, opts);
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{sub(in[0], in[1])}; },
                   {non_contiguous(random_tensor({3, 17}, 3)), random_tensor({3, 1}, 4)}, opts);
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{in[0] - in[1]}; },
                   {random_tensor({1}, 5), non_contiguous(random_tensor({65, 3}, 6))}, opts);
}

TEST(Arithmetic, MulAndDivGradients) {
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{mul(in[0], in[1])}; },
                   {non_contiguous(random_tensor({65, 3}, 7)), random_tensor({1, 3}, 8)});
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{in[0] * in[1]}; },
                   {random_tensor({3, 1, 17}, 9), non_contiguous(random_tensor({17}, 10))});
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{div(in[0], in[1])}; },
                   {non_contiguous(random_tensor({3, 17}, 11)), away_from_zero({3, 1}, 12)});
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{div(in[0], in[1])}; },
                   {random_tensor({17}, 13), non_contiguous(away_from_zero({3, 1, 17}, 14))});
}

TEST(Arithmetic, ScaleAndReusedOperandGradients) {
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{scale(in[0], -1.75)}; },
                   {non_contiguous(random_tensor({3, 17}, 15))});
  // x * x + 3 (x - y): x feeds three paths, the engine adds them.
  EXPECT_GRADCHECK(
      [](const std::vector<Variable>& in) {
        return std::vector<Variable>{add(mul(in[0], in[0]), scale(sub(in[0], in[1]), 3.0))};
      },
      {away_from_zero({17}, 16), random_tensor({3, 1}, 17)});
}

TEST(Arithmetic, GradientOnlyForInputsThatRequireIt) {
  Variable a(random_tensor({3, 17}, 18), true), b(random_tensor({17}, 19), false);
  Variable out = sum(mul(a, b));
  out.backward();
  EXPECT_TRUE(a.grad().defined());
  EXPECT_FALSE(b.grad().defined());
  // d/da sum(a * b) = b broadcast over rows.
  EXPECT_TENSOR_CLOSE(a.grad(), b.data().expand({3, 17}).contiguous(), 0, 0);
  NoGradGuard no_grad;
  EXPECT_FALSE(add(a, b).requires_grad());
}

TEST(Arithmetic, ErrorsNameShapesAndDtypes) {
  Variable a(Tensor::zeros({3, 2}, DType::f64)), b(Tensor::zeros({4, 2}, DType::f64));
  EXPECT_ERROR_MENTIONS(add(a, b), "add", "(3, 2)", "(4, 2)");
  EXPECT_ERROR_MENTIONS(div(b, a), "div", "(3, 2)", "(4, 2)");
  Variable f(Tensor::zeros({3, 2}, DType::f32));
  EXPECT_ERROR_MENTIONS(mul(a, f), "mul", "f64", "f32");
  Variable i(Tensor::zeros({3, 2}, DType::i64));
  EXPECT_ERROR_MENTIONS(sub(i, i), "sub", "i64");
  EXPECT_ERROR_MENTIONS(scale(i, 2.0), "scale", "i64");
  EXPECT_ERROR_MENTIONS(add(Variable(), a), "add", "undefined");
}

TEST(Arithmetic, CudaTensorsRunOnTheGpuAndMixedDevicesAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Variable a(Tensor::ones({3}, DType::f32, Device::cuda(0)));
  Variable sum = add(a, a);
  EXPECT_EQ(sum.device(), Device::cuda(0));
  EXPECT_EQ(sum.data().to_vector<float>(), std::vector<float>({2.f, 2.f, 2.f}));
  Variable host(Tensor::ones({3}), true);  // needs a gradient: not uploaded silently
  EXPECT_ERROR_MENTIONS(add(a, host), "add", "cpu", "cuda:0");
}

}  // namespace
}  // namespace loom
