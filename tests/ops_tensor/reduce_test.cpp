// sum/mean over all elements and over one dim (keepdim or not): values
// against plain loops, finite-difference gradients, out-of-range dims.
#include <gtest/gtest.h>

#include "framework/ops_tensor.h"
#include "tests/ops_tensor/reference.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::non_contiguous;
using testing::random_tensor;

// Sum of x (row-major values `v` of `shape`) over `dim`, by plain loops.
std::vector<double> loop_sum(const std::vector<double>& v, const Shape& shape, int64_t dim) {
  Shape out_shape = shape;
  out_shape[dim] = 1;
  std::vector<double> out(shape_numel(out_shape), 0.0);
  for (size_t i = 0; i < v.size(); ++i) {
    std::vector<int64_t> idx = testing::unravel(static_cast<int64_t>(i), shape);
    out[testing::broadcast_position(idx, out_shape)] += v[i];
  }
  return out;
}

TEST(Reduce, SumAndMeanOfAllElements) {
  Variable x(Tensor::arange(12, DType::f64).view({3, 4}));
  Variable s = sum(x), m = mean(x);
  EXPECT_EQ(s.shape(), Shape{});
  EXPECT_EQ(s.item(), 66.0);
  EXPECT_EQ(m.item(), 5.5);
  Variable f(Tensor::arange(12, DType::f32).view({3, 4}).transpose(0, 1));  // non-contiguous
  EXPECT_EQ(sum(f).dtype(), DType::f32);
  EXPECT_EQ(sum(f).item(), 66.0);
  // f32 input, accumulated in double: 10^6 copies of 0.1f sum to 10^6 * 0.1f to f32 precision.
  Variable many(Tensor::full({1000, 1000}, 0.1, DType::f32));
  EXPECT_NEAR(sum(many).item(), 1e6 * static_cast<double>(0.1f), 0.05);
}

TEST(Reduce, SumAndMeanOverEachDimMatchLoops) {
  Shape shape{3, 4, 5};
  Tensor x = random_tensor(shape, 1);
  std::vector<double> v = x.to_vector<double>();
  for (int64_t dim = 0; dim < 3; ++dim) {
    Shape kept = shape, dropped = shape;
    kept[dim] = 1;
    dropped.erase(dropped.begin() + dim);
    Tensor expected = Tensor::from_vector(loop_sum(v, shape, dim), kept);
    Variable kd = sum(Variable(x), dim, true), nd = sum(Variable(non_contiguous(x)), dim - 3, false);
    EXPECT_EQ(kd.shape(), kept);
    EXPECT_EQ(nd.shape(), dropped);
    EXPECT_TENSOR_CLOSE(kd.data(), expected, 1e-14, 1e-14);
    EXPECT_TENSOR_CLOSE(nd.data().reshape(kept), expected, 1e-14, 1e-14);
    std::vector<double> means = loop_sum(v, shape, dim);
    for (double& m : means) m /= static_cast<double>(shape[dim]);
    EXPECT_TENSOR_CLOSE(mean(Variable(x), dim, true).data(), Tensor::from_vector(means, kept), 1e-14, 1e-14);
  }
}

TEST(Reduce, Gradients) {
  auto grad_fn = [](auto op) {
    return [op](const std::vector<Variable>& in) { return std::vector<Variable>{op(in[0])}; };
  };
  EXPECT_GRADCHECK(grad_fn([](const Variable& x) { return sum(x); }), {non_contiguous(random_tensor({17, 3}, 2))});
  EXPECT_GRADCHECK(grad_fn([](const Variable& x) { return mean(x); }), {random_tensor({3, 1, 17}, 3)});
  EXPECT_GRADCHECK(grad_fn([](const Variable& x) { return sum(x, 1, true); }),
                   {non_contiguous(random_tensor({3, 17, 5}, 4))});
  EXPECT_GRADCHECK(grad_fn([](const Variable& x) { return mean(x, -1, false); }),
                   {non_contiguous(random_tensor({3, 65}, 5))});
  EXPECT_GRADCHECK(grad_fn([](const Variable& x) { return sum(x, 0, false); }), {random_tensor({65, 3}, 6)});
  EXPECT_GRADCHECK(grad_fn([](const Variable& x) { return mean(x, 0, true); }), {random_tensor({1, 17}, 7)});
  // A reduction feeding broadcasting arithmetic: x - mean(x, -1, keepdim).
  EXPECT_GRADCHECK(grad_fn([](const Variable& x) { return sub(x, mean(x, -1, true)); }),
                   {non_contiguous(random_tensor({3, 17}, 8))});
}

TEST(Reduce, ErrorsNameDimAndShape) {
  Variable x(Tensor::zeros({3, 4}, DType::f64));
  EXPECT_ERROR_MENTIONS(sum(x, 2), "sum", "dim 2", "(3, 4)");
  EXPECT_ERROR_MENTIONS(mean(x, -3, true), "mean", "dim -3", "(3, 4)");
  EXPECT_ERROR_MENTIONS(sum(Variable(Tensor::zeros({3}, DType::i32))), "sum", "i32");
}

}  // namespace
}  // namespace loom
