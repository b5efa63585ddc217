// softmax: forward against exp/sum by hand over every dim, rows summing to 1,
// stability for large logits, gradients (non-contiguous, non-last dims), errors.
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

// softmax over dim `d` of a 3-D tensor (A, B, C), by explicit loops without max subtraction.
Tensor naive_softmax_3d(const Tensor& x, int64_t d) {
  Shape s = x.shape();
  std::vector<double> v = values(x), y(v.size());
  auto at = [&](int64_t a, int64_t b, int64_t c) { return (a * s[1] + b) * s[2] + c; };
  for (int64_t a = 0; a < s[0]; ++a)
    for (int64_t b = 0; b < s[1]; ++b)
      for (int64_t c = 0; c < s[2]; ++c) {
        double total = 0.0;
        for (int64_t m = 0; m < s[d]; ++m) {
          int64_t idx[3] = {a, b, c};
          idx[d] = m;
          total += std::exp(v[at(idx[0], idx[1], idx[2])]);
        }
        y[at(a, b, c)] = std::exp(v[at(a, b, c)]) / total;
      }
  return Tensor::from_vector(y, s);
}

TEST(Softmax, ForwardMatchesReferenceOnEveryDim) {
  Tensor x = random_tensor({3, 5, 17}, 1, DType::f64, 2.0);
  for (int64_t d = 0; d < 3; ++d) {
    EXPECT_TENSOR_CLOSE(softmax(Variable(x), d).data(), naive_softmax_3d(x, d), 1e-13, 1e-15) << "dim " << d;
    EXPECT_TENSOR_CLOSE(softmax(Variable(x), d - 3).data(), naive_softmax_3d(x, d), 1e-13, 1e-15) << "dim " << d - 3;
  }
  EXPECT_TENSOR_CLOSE(softmax(Variable(x)).data(), naive_softmax_3d(x, 2), 1e-13, 1e-15);
}

TEST(Softmax, RowsSumToOne) {
  Tensor x = random_tensor({17, 65}, 2, DType::f32, 5.0);
  std::vector<double> y = values(softmax(Variable(x)).data());
  for (int64_t r = 0; r < 17; ++r) {
    double total = 0.0;
    for (int64_t c = 0; c < 65; ++c) {
      EXPECT_GE(y[r * 65 + c], 0.0);
      total += y[r * 65 + c];
    }
    EXPECT_NEAR(total, 1.0, 1e-6) << "row " << r;
  }
}

TEST(Softmax, StableForLargeLogits) {
  Tensor x = Tensor::from_vector<double>({1000.0, 1001.0, 1002.0, -1000.0, -1001.0, -1002.0}, {2, 3});
  Tensor y = softmax(Variable(x)).data();
  Tensor shifted = Tensor::from_vector<double>({0.0, 1.0, 2.0, 0.0, -1.0, -2.0}, {2, 3});
  EXPECT_TENSOR_CLOSE(y, naive_softmax_3d(shifted.view({1, 2, 3}), 2).view({2, 3}), 1e-14, 1e-15);
  Tensor y32 = softmax(Variable(x.to(DType::f32))).data();
  EXPECT_TENSOR_CLOSE(y32, y, 1e-6, 1e-7);
}

TEST(Softmax, GradCheck) {
  for (int64_t d : {-1, 0, 1}) {
    auto fn = [d](const std::vector<Variable>& in) { return std::vector<Variable>{softmax(in[0], d)}; };
    EXPECT_GRADCHECK(fn, {random_tensor({3, 17, 3}, 3 + d)}) << "dim " << d;
  }
  auto last = [](const std::vector<Variable>& in) { return std::vector<Variable>{softmax(in[0])}; };
  EXPECT_GRADCHECK(last, {random_tensor({1, 65}, 7)});
  EXPECT_GRADCHECK(last, {random_tensor({17, 1}, 8)});
}

TEST(Softmax, GradCheckNonContiguous) {
  auto mid = [](const std::vector<Variable>& in) { return std::vector<Variable>{softmax(in[0], 1)}; };
  auto last = [](const std::vector<Variable>& in) { return std::vector<Variable>{softmax(in[0], -1)}; };
  EXPECT_GRADCHECK(mid, {non_contiguous(random_tensor({3, 17, 3}, 9))});
  EXPECT_GRADCHECK(last, {random_tensor({17, 3}, 10).transpose(0, 1)});
}

TEST(Softmax, ThreadedPath) {
  Tensor x = random_tensor({3, 65, 257}, 11);
  EXPECT_TENSOR_CLOSE(softmax(Variable(x), 1).data(), naive_softmax_3d(x, 1), 1e-13, 1e-15);
  auto fn = [](const std::vector<Variable>& in) { return std::vector<Variable>{softmax(in[0], -1)}; };
  EXPECT_TRUE(testing::spot_gradcheck(fn, {x}, 8, 12));
}

TEST(Softmax, ErrorsNameTheValues) {
  Variable x(random_tensor({3, 4}, 1));
  EXPECT_ERROR_MENTIONS(softmax(x, 2), {"softmax", "dim 2", "(3, 4)"});
  EXPECT_ERROR_MENTIONS(softmax(x, -3), {"softmax", "dim -3", "(3, 4)"});
  EXPECT_ERROR_MENTIONS(softmax(Variable(Tensor::zeros({3}, DType::i64))), {"softmax", "i64"});
}

}  // namespace
}  // namespace loom
