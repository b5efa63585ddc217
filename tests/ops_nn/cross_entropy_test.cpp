// cross_entropy: forward against log-sum-exp by hand (mean, sum, ignore_index,
// all ignored), stability for large logits, i32 targets, gradients by finite
// differences (non-contiguous included), errors.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops_nn.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::non_contiguous;
using testing::random_indices;
using testing::random_tensor;
using testing::values;

// Sum over non-ignored rows of log(sum_c exp(x[n, c])) - x[n, t_n], and the count.
std::pair<double, int64_t> naive_nll_sum(const Tensor& logits, const std::vector<int64_t>& targets, int64_t ignore) {
  std::vector<double> x = values(logits);
  int64_t N = logits.size(0), V = logits.size(1), count = 0;
  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] == ignore) continue;
    double s = 0.0;
    for (int64_t c = 0; c < V; ++c) s += std::exp(x[n * V + c]);
    total += std::log(s) - x[n * V + targets[n]];
    ++count;
  }
  return {total, count};
}

TEST(CrossEntropy, ForwardMatchesReference) {
  Tensor logits = random_tensor({5, 17}, 1, DType::f64, 2.0);
  std::vector<int64_t> t = {3, -100, 16, 0, 7};
  Tensor targets = Tensor::from_vector(t, {5});
  auto [total, count] = naive_nll_sum(logits, t, -100);
  EXPECT_EQ(count, 4);
  EXPECT_NEAR(cross_entropy(Variable(logits), targets).item(), total / 4, 1e-13);
  EXPECT_NEAR(cross_entropy(Variable(logits), targets, -100, Reduction::sum).item(), total, 1e-13);
  // A different ignore_index: -100 is then an invalid target, so use 16 instead.
  std::vector<int64_t> t2 = {3, 2, 16, 0, 7};
  auto [total2, count2] = naive_nll_sum(logits, t2, 16);
  EXPECT_NEAR(cross_entropy(Variable(logits), Tensor::from_vector(t2, {5}), 16).item(), total2 / count2, 1e-13);
  // i32 targets and f32 logits.
  Tensor t32 = Tensor::from_vector<int32_t>({3, -100, 16, 0, 7}, {5});
  EXPECT_NEAR(cross_entropy(Variable(logits), t32).item(), total / 4, 1e-13);
  Variable loss32 = cross_entropy(Variable(logits.to(DType::f32)), targets);
  EXPECT_EQ(loss32.dtype(), DType::f32);
  EXPECT_EQ(loss32.shape(), Shape{});
  EXPECT_NEAR(loss32.item(), total / 4, 1e-5);
}

TEST(CrossEntropy, StableForLargeLogits) {
  Tensor logits = Tensor::from_vector<double>({10000.0, 10001.0, 10002.0, -5000.0, -5001.0, -5002.0}, {2, 3});
  Tensor targets = Tensor::from_vector<int64_t>({0, 2}, {2});
  Tensor shifted = Tensor::from_vector<double>({0.0, 1.0, 2.0, 0.0, -1.0, -2.0}, {2, 3});
  auto [total, count] = naive_nll_sum(shifted, {0, 2}, -100);
  EXPECT_NEAR(cross_entropy(Variable(logits), targets).item(), total / count, 1e-12);
  Variable l32(logits.to(DType::f32), true);
  Variable loss = cross_entropy(l32, targets);
  EXPECT_NEAR(loss.item(), total / count, 1e-5);
  loss.backward();
  for (double g : values(l32.grad())) EXPECT_TRUE(std::isfinite(g));
}

TEST(CrossEntropy, AllIgnoredGivesZeroLossAndZeroGradients) {
  Variable logits(random_tensor({3, 5}, 2), true);
  Tensor targets = Tensor::from_vector<int64_t>({-100, -100, -100}, {3});
  for (Reduction r : {Reduction::mean, Reduction::sum}) {
    logits.zero_grad();
    Variable loss = cross_entropy(logits, targets, -100, r);
    EXPECT_EQ(loss.item(), 0.0);
    loss.backward();
    for (double g : values(logits.grad())) EXPECT_EQ(g, 0.0);
  }
}

TEST(CrossEntropy, GradientIsSoftmaxMinusOneHotOverCount) {
  Tensor logits = random_tensor({3, 4}, 3);
  Variable lv(logits, true);
  Tensor targets = Tensor::from_vector<int64_t>({1, -100, 3}, {3});
  cross_entropy(lv, targets).backward(Tensor::scalar(2.0, DType::f64));
  std::vector<double> x = values(logits), g = values(lv.grad());
  for (int64_t n = 0; n < 3; ++n) {
    double s = 0.0;
    for (int64_t c = 0; c < 4; ++c) s += std::exp(x[n * 4 + c]);
    for (int64_t c = 0; c < 4; ++c) {
      double expected = n == 1 ? 0.0 : (std::exp(x[n * 4 + c]) / s - (c == (n == 0 ? 1 : 3))) * 2.0 / 2.0;
      EXPECT_NEAR(g[n * 4 + c], expected, 1e-14) << n << ", " << c;
    }
  }
}

TEST(CrossEntropy, GradCheck) {
  Tensor targets = random_indices({17}, 17, 4);
  targets.data<int64_t>()[5] = -100;
  targets.data<int64_t>()[11] = -100;
  auto mean = [&](const std::vector<Variable>& in) { return std::vector<Variable>{cross_entropy(in[0], targets)}; };
  EXPECT_GRADCHECK(mean, {random_tensor({17, 17}, 5, DType::f64, 2.0)});
  Tensor t3 = random_indices({3}, 65, 6);
  auto sum = [&](const std::vector<Variable>& in) {
    return std::vector<Variable>{cross_entropy(in[0], t3, -100, Reduction::sum)};
  };
  EXPECT_GRADCHECK(sum, {random_tensor({3, 65}, 7)});
  Tensor t1 = Tensor::from_vector<int32_t>({2}, {1});
  auto one = [&](const std::vector<Variable>& in) { return std::vector<Variable>{cross_entropy(in[0], t1)}; };
  EXPECT_GRADCHECK(one, {random_tensor({1, 3}, 8)});
}

TEST(CrossEntropy, GradCheckNonContiguous) {
  Tensor targets = random_indices({17}, 3, 9);
  auto fn = [&](const std::vector<Variable>& in) { return std::vector<Variable>{cross_entropy(in[0], targets)}; };
  EXPECT_GRADCHECK(fn, {non_contiguous(random_tensor({17, 3}, 10))});
  Tensor t3 = random_indices({3}, 17, 11);
  auto fn3 = [&](const std::vector<Variable>& in) {
    return std::vector<Variable>{cross_entropy(in[0], t3, -100, Reduction::sum)};
  };
  EXPECT_GRADCHECK(fn3, {random_tensor({17, 3}, 12).transpose(0, 1)});
}

TEST(CrossEntropy, ThreadedPath) {
  Tensor logits = random_tensor({33, 1025}, 13);
  Tensor targets = random_indices({33}, 1025, 14);
  std::vector<int64_t> t = targets.to_vector<int64_t>();
  auto [total, count] = naive_nll_sum(logits, t, -100);
  EXPECT_NEAR(cross_entropy(Variable(logits), targets).item(), total / count, 1e-12);
  auto fn = [&](const std::vector<Variable>& in) { return std::vector<Variable>{cross_entropy(in[0], targets)}; };
  EXPECT_TRUE(testing::spot_gradcheck(fn, {logits}, 8, 15));
}

TEST(CrossEntropy, ErrorsNameTheValues) {
  Variable logits(random_tensor({3, 5}, 1));
  EXPECT_ERROR_MENTIONS(cross_entropy(logits, Tensor::from_vector<int64_t>({0, 7, 1}, {3})),
                        {"cross_entropy", "target 7", "row 1", "[0, 5)"});
  EXPECT_ERROR_MENTIONS(cross_entropy(logits, Tensor::from_vector<int64_t>({0, 1, -3}, {3})),
                        {"cross_entropy", "target -3", "row 2"});
  EXPECT_ERROR_MENTIONS(cross_entropy(logits, Tensor::from_vector<int64_t>({0, 1}, {2})),
                        {"cross_entropy", "(2,)", "(3, 5)"});
  EXPECT_ERROR_MENTIONS(cross_entropy(logits, Tensor::zeros({3}, DType::f32)), {"cross_entropy", "f32"});
  EXPECT_ERROR_MENTIONS(cross_entropy(Variable(random_tensor({3, 5, 2}, 2)), Tensor::zeros({3}, DType::i64)),
                        {"cross_entropy", "(3, 5, 2)"});
}

}  // namespace
}  // namespace loom
