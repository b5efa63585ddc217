// reshape, transpose, permute, slice, narrow, concat, contiguous: values and
// view semantics, finite-difference gradients (non-contiguous inputs and
// chains of views), errors naming dims and shapes.
#include <gtest/gtest.h>

#include "framework/ops_tensor.h"
#include "tests/ops_tensor/reference.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::non_contiguous;
using testing::random_tensor;

template <typename Op>
testing::GradFn unary(Op op) {
  return [op](const std::vector<Variable>& in) { return std::vector<Variable>{op(in[0])}; };
}

TEST(Shape, ReshapeIsAViewAndInfersOneDim) {
  Variable x(Tensor::arange(12, DType::f64).view({3, 4}));
  Variable r = reshape(x, {2, -1, 2});
  EXPECT_EQ(r.shape(), (Shape{2, 3, 2}));
  EXPECT_TRUE(r.data().shares_storage(x.data()));
  EXPECT_EQ(r.data().to_vector<double>(), x.data().to_vector<double>());
  Variable t(Tensor::arange(12, DType::f64).view({3, 4}).transpose(0, 1));  // (4, 3), non-contiguous
  EXPECT_EQ(reshape(t, {12}).data().to_vector<double>(), t.data().to_vector<double>());
  EXPECT_GRADCHECK(unary([](const Variable& v) { return reshape(v, {17, -1}); }),
                   {non_contiguous(random_tensor({3, 17}, 1))});
  EXPECT_GRADCHECK(unary([](const Variable& v) { return reshape(v, {5, 1, 13}); }), {random_tensor({65}, 2)});
  EXPECT_ERROR_MENTIONS(reshape(x, {5, 3}), "reshape", "(3, 4)", "(5, 3)");
  EXPECT_ERROR_MENTIONS(reshape(x, {-1, -1}), "reshape", "-1");
}

TEST(Shape, TransposeAndPermuteMoveElements) {
  Tensor x = Tensor::arange(24, DType::f64).view({2, 3, 4});
  Variable t = transpose(Variable(x), 0, -1);  // (4, 3, 2): t[i][j][k] = x[k][j][i] = 12k + 4j + i
  EXPECT_EQ(t.shape(), (Shape{4, 3, 2}));
  std::vector<double> tv = t.data().to_vector<double>();
  EXPECT_EQ(tv[(1 * 3 + 2) * 2 + 1], 12 * 1 + 4 * 2 + 1);
  Variable p = permute(Variable(x), {1, 2, 0});  // (3, 4, 2): p[i][j][k] = x[k][i][j] = 12k + 4i + j
  EXPECT_EQ(p.shape(), (Shape{3, 4, 2}));
  std::vector<double> pv = p.data().to_vector<double>();
  EXPECT_EQ(pv[(2 * 4 + 3) * 2 + 1], 12 * 1 + 4 * 2 + 3);
  EXPECT_GRADCHECK(unary([](const Variable& v) { return transpose(v, 0, 2); }),
                   {non_contiguous(random_tensor({3, 5, 17}, 3))});
  EXPECT_GRADCHECK(unary([](const Variable& v) { return permute(v, {2, 0, 1}); }),
                   {non_contiguous(random_tensor({3, 1, 17}, 4))});
  EXPECT_ERROR_MENTIONS(transpose(Variable(x), 0, 3), "transpose", "dim 3", "(2, 3, 4)");
  EXPECT_ERROR_MENTIONS(permute(Variable(x), {0, 1}), "permute", "(0, 1)", "(2, 3, 4)");
  EXPECT_ERROR_MENTIONS(permute(Variable(x), {0, 2, -1}), "permute", "repeated");
}

TEST(Shape, SliceAndNarrowSelectWindows) {
  Tensor x = Tensor::arange(20, DType::f64).view({4, 5});
  Variable s = slice(Variable(x), 1, 1, 5, 2);  // columns 1, 3
  EXPECT_EQ(s.data().to_vector<double>(), (std::vector<double>{1, 3, 6, 8, 11, 13, 16, 18}));
  EXPECT_TRUE(s.data().shares_storage(x));
  Variable tail = slice(Variable(x), 0, -2, 100);  // rows 2, 3 (end clamps)
  EXPECT_EQ(tail.shape(), (Shape{2, 5}));
  EXPECT_EQ(tail.data().to_vector<double>().front(), 10);
  Variable n = narrow(Variable(x), -1, 2, 3);
  EXPECT_EQ(n.data().to_vector<double>(), (std::vector<double>{2, 3, 4, 7, 8, 9, 12, 13, 14, 17, 18, 19}));
  EXPECT_GRADCHECK(unary([](const Variable& v) { return slice(v, 0, 2, 15, 3); }),
                   {non_contiguous(random_tensor({17, 5}, 5))});
  EXPECT_GRADCHECK(unary([](const Variable& v) { return slice(v, -1, -3, 17); }), {random_tensor({3, 17}, 6)});
  EXPECT_GRADCHECK(unary([](const Variable& v) { return narrow(v, 1, 1, 1); }),
                   {non_contiguous(random_tensor({3, 3, 17}, 7))});
  EXPECT_ERROR_MENTIONS(slice(Variable(x), 1, 4, 2), "slice", "[4, 2)", "(4, 5)");
  EXPECT_ERROR_MENTIONS(slice(Variable(x), 2, 0, 1), "slice", "dim 2", "(4, 5)");
  EXPECT_ERROR_MENTIONS(slice(Variable(x), 0, 0, 4, 0), "slice", "step 0");
  EXPECT_ERROR_MENTIONS(narrow(Variable(x), 1, 3, 3), "narrow", "start 3", "length 3", "(4, 5)");
}

TEST(Shape, ConcatAlongAnyDim) {
  Tensor a = Tensor::arange(6, DType::f64).view({2, 3});
  Tensor b = Tensor::full({2, 1}, -1.0, DType::f64);
  Variable c = concat({Variable(a), Variable(b)}, -1);
  EXPECT_EQ(c.shape(), (Shape{2, 4}));
  EXPECT_EQ(c.data().to_vector<double>(), (std::vector<double>{0, 1, 2, -1, 3, 4, 5, -1}));
  Variable r = concat({Variable(a), Variable(a.transpose(0, 1).contiguous().transpose(0, 1))}, 0);
  EXPECT_EQ(r.data().to_vector<double>(), (std::vector<double>{0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5}));
  EXPECT_GRADCHECK(
      [](const std::vector<Variable>& in) { return std::vector<Variable>{concat({in[0], in[1], in[2]}, 1)}; },
      {random_tensor({3, 1, 5}, 8), non_contiguous(random_tensor({3, 17, 5}, 9)), random_tensor({3, 3, 5}, 10)});
  EXPECT_GRADCHECK(
      [](const std::vector<Variable>& in) { return std::vector<Variable>{concat({in[0], in[1], in[0]}, -1)}; },
      {non_contiguous(random_tensor({3, 17}, 11)), random_tensor({3, 1}, 12)});
  EXPECT_ERROR_MENTIONS(concat({Variable(a), Variable(Tensor::zeros({3, 1}, DType::f64))}, 1), "concat", "(3, 1)",
                        "(2, 3)", "dim 1");
  EXPECT_ERROR_MENTIONS(concat({Variable(a), Variable(Tensor::zeros({2, 3}, DType::f32))}, 0), "concat", "f32",
                        "f64");
  EXPECT_ERROR_MENTIONS(concat({Variable(a)}, 2), "concat", "dim 2", "(2, 3)");
  EXPECT_ERROR_MENTIONS(concat({}, 0), "concat", "no inputs");
}

TEST(Shape, ContiguousCopiesStridedInputs) {
  Tensor x = non_contiguous(random_tensor({3, 17}, 13));
  Variable c = contiguous(Variable(x));
  EXPECT_TRUE(c.data().is_contiguous());
  EXPECT_TENSOR_CLOSE(c.data(), x, 0, 0);
  EXPECT_GRADCHECK(unary([](const Variable& v) { return contiguous(v); }), {x});
}

TEST(Shape, ChainsOfViewsKeepGradientsRight) {
  // Views sharing one storage, then ops reading them: slice -> transpose -> matmul with itself.
  EXPECT_GRADCHECK(
      [](const std::vector<Variable>& in) {
        Variable window = slice(in[0], 1, 1, 16, 2);  // (3, 8)
        Variable flipped = transpose(window, 0, 1);   // (8, 3)
        return std::vector<Variable>{matmul(flipped, window), sum(reshape(narrow(in[0], 0, 1, 2), {-1}))};
      },
      {non_contiguous(random_tensor({3, 17}, 14))});
}

TEST(Cast, ConvertsValuesAndSendsGradientsBackInTheInputDtype) {
  Tensor x = Tensor::from_vector(std::vector<double>{1.0, 1.0 + 1.0 / 512, -3.25, 1e-3}, {4});
  Variable xv(x.to(DType::f32), true);
  Variable y = cast(xv, DType::bf16);
  EXPECT_EQ(y.dtype(), DType::bf16);
  // 1 + 2^-9 is below bf16's half ulp at 1 (2^-8): it rounds to 1; the others are within bf16's rounding.
  EXPECT_TENSOR_CLOSE(y.data().to(DType::f64), Tensor::from_vector(std::vector<double>{1.0, 1.0, -3.25, 1e-3}, {4}),
                      4e-3, 0);
  EXPECT_EQ(y.data().to(DType::f64).to_vector<double>()[1], 1.0);
  // (CPU arithmetic is f32/f64: back to f32 for the product; the gradient passes both casts.)
  sum(mul(cast(y, DType::f32), Variable(Tensor::from_vector(std::vector<double>{1, 2, 3, 4}, {4}).to(DType::f32))))
      .backward();
  EXPECT_EQ(xv.grad().dtype(), DType::f32);
  EXPECT_TENSOR_CLOSE(xv.grad().to(DType::f64), Tensor::from_vector(std::vector<double>{1, 2, 3, 4}, {4}), 0, 0);
  Variable same(x, true);
  EXPECT_EQ(cast(same, DType::f64).grad_fn(), same.grad_fn());  // same dtype: the input itself
  EXPECT_THROW(cast(Variable(Tensor::arange(3)), DType::f32), Error);
}

TEST(Cast, RoundTripGradientsMatchFiniteDifferences) {
  // x -> f32 -> x^2 in f32 -> f64: the quadratic makes central differences exact up to f32 rounding.
  testing::GradCheckOptions options;
  options.eps = 1e-2;
  options.rtol = 1e-4;
  options.atol = 1e-6;
  EXPECT_GRADCHECK(unary([](const Variable& v) {
                     Variable v32 = cast(v, DType::f32);
                     return cast(mul(v32, v32), DType::f64);
                   }),
                   {random_tensor({3, 5}, 21)}, options);
}

}  // namespace
}  // namespace loom
