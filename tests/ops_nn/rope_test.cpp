// rope: forward against the rotate-half formula written out, explicit and
// non-consecutive positions (shared and per batch, i64 and i32), the relative
// position property, gradients (non-contiguous included), errors.
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

// out_i = x_i cos - x_{i+D/2} sin, out_{i+D/2} = x_{i+D/2} cos + x_i sin,
// angle = pos[b][t] * theta^(-2i/D); pos given per (b, t).
Tensor naive_rope(const Tensor& x, const std::vector<std::vector<int64_t>>& pos, double theta) {
  int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  std::vector<double> v = values(x), y(v.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          double angle = static_cast<double>(pos[b][t]) * std::pow(theta, -2.0 * i / D);
          int64_t base = ((b * T + t) * H + h) * D;
          double lo = v[base + i], hi = v[base + i + D / 2];
          y[base + i] = lo * std::cos(angle) - hi * std::sin(angle);
          y[base + i + D / 2] = hi * std::cos(angle) + lo * std::sin(angle);
        }
  return Tensor::from_vector(y, x.shape());
}

TEST(Rope, ForwardMatchesFormulaWithNonConsecutivePositions) {
  Tensor x = random_tensor({2, 3, 2, 8}, 1);
  std::vector<int64_t> pos = {0, 5, 17};
  Tensor y = rope(Variable(x), Tensor::from_vector(pos, {3}), 10000.0).data();
  EXPECT_TENSOR_CLOSE(y, naive_rope(x, {pos, pos}, 10000.0), 1e-13, 1e-14);
}

TEST(Rope, PerBatchPositionsAndInt32) {
  Tensor x = random_tensor({2, 3, 3, 6}, 2);
  std::vector<std::vector<int64_t>> pos = {{4, 9, 100}, {70000, 1, 2}};
  Tensor p64 = Tensor::from_vector<int64_t>({4, 9, 100, 70000, 1, 2}, {2, 3});
  Tensor p32 = Tensor::from_vector<int32_t>({4, 9, 100, 70000, 1, 2}, {2, 3});
  Tensor expected = naive_rope(x, pos, 500.0);
  EXPECT_TENSOR_CLOSE(rope(Variable(x), p64, 500.0).data(), expected, 1e-12, 1e-13);
  EXPECT_TENSOR_CLOSE(rope(Variable(x), p32, 500.0).data(), expected, 1e-12, 1e-13);
  EXPECT_TENSOR_CLOSE(rope(Variable(x.to(DType::f32)), p64, 500.0).data(), expected, 1e-5, 1e-5);
}

TEST(Rope, PositionZeroIsIdentityAndNormIsKept) {
  Tensor x = random_tensor({1, 2, 2, 4}, 3);
  Tensor y0 = rope(Variable(x), Tensor::zeros({2}, DType::i64), 10000.0).data();
  EXPECT_TENSOR_CLOSE(y0, x, 0.0, 0.0);
  Tensor y = rope(Variable(x), Tensor::from_vector<int64_t>({3, 11}, {2}), 10000.0).data();
  double nx = 0.0, ny = 0.0;
  for (double v : values(x)) nx += v * v;
  for (double v : values(y)) ny += v * v;
  EXPECT_NEAR(nx, ny, 1e-12);
}

TEST(Rope, DotProductDependsOnRelativePosition) {
  // <rope(q, m), rope(k, n)> depends on m - n only.
  Tensor q = random_tensor({1, 1, 1, 16}, 4), k = random_tensor({1, 1, 1, 16}, 5);
  auto score = [&](int64_t m, int64_t n) {
    std::vector<double> a = values(rope(Variable(q), Tensor::from_vector<int64_t>({m}, {1}), 10000.0).data());
    std::vector<double> b = values(rope(Variable(k), Tensor::from_vector<int64_t>({n}, {1}), 10000.0).data());
    double s = 0.0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
  };
  EXPECT_NEAR(score(7, 3), score(1004, 1000), 1e-10);
  EXPECT_NEAR(score(2, 9), score(52, 59), 1e-10);
}

TEST(Rope, GradCheck) {
  Tensor pos = Tensor::from_vector<int64_t>({3, 0, 17}, {3});
  auto fn = [&](const std::vector<Variable>& in) { return std::vector<Variable>{rope(in[0], pos, 10000.0)}; };
  EXPECT_GRADCHECK(fn, {random_tensor({2, 3, 3, 6}, 6)});
  Tensor pos_b = Tensor::from_vector<int32_t>({5, 2, 65, 1, 1, 40}, {2, 3});
  auto per_batch = [&](const std::vector<Variable>& in) { return std::vector<Variable>{rope(in[0], pos_b, 100.0)}; };
  EXPECT_GRADCHECK(per_batch, {random_tensor({2, 3, 1, 2}, 7)});
}

TEST(Rope, GradCheckNonContiguous) {
  Tensor pos = Tensor::from_vector<int64_t>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 33}, {17});
  auto fn = [&](const std::vector<Variable>& in) { return std::vector<Variable>{rope(in[0], pos, 10000.0)}; };
  EXPECT_GRADCHECK(fn, {non_contiguous(random_tensor({1, 17, 3, 4}, 8))});
  // (B, T, H, D) view of a (B, H, T, D) buffer, as after a head split.
  EXPECT_GRADCHECK(fn, {random_tensor({1, 3, 17, 4}, 9).transpose(1, 2)});
}

TEST(Rope, ThreadedPath) {
  Tensor x = random_tensor({2, 65, 4, 66}, 10);
  std::vector<int64_t> p(65);
  for (int64_t t = 0; t < 65; ++t) p[t] = 3 * t + 1;
  Tensor y = rope(Variable(x), Tensor::from_vector(p, {65}), 10000.0).data();
  EXPECT_TENSOR_CLOSE(y, naive_rope(x, {p, p}, 10000.0), 1e-12, 1e-13);
}

TEST(Rope, ErrorsNameTheValues) {
  Tensor pos = Tensor::arange(3);
  EXPECT_ERROR_MENTIONS(rope(Variable(random_tensor({1, 3, 2, 7}, 1)), pos, 10000.0), {"rope", "D = 7", "even"});
  EXPECT_ERROR_MENTIONS(rope(Variable(random_tensor({1, 3, 2, 8}, 2)), Tensor::arange(4), 10000.0),
                        {"rope", "(4,)", "T = 3", "(1, 3, 2, 8)"});
  EXPECT_ERROR_MENTIONS(rope(Variable(random_tensor({2, 3, 2, 8}, 3)), Tensor::zeros({3, 3}, DType::i64), 10000.0),
                        {"rope", "(3, 3)", "(2, 3)"});
  EXPECT_ERROR_MENTIONS(rope(Variable(random_tensor({1, 3, 2, 8}, 4)), Tensor::zeros({3}, DType::f32), 10000.0),
                        {"rope", "positions", "f32"});
  EXPECT_ERROR_MENTIONS(rope(Variable(random_tensor({3, 2, 8}, 5)), pos, 10000.0), {"rope", "(3, 2, 8)"});
  EXPECT_ERROR_MENTIONS(rope(Variable(random_tensor({1, 3, 2, 8}, 6)), pos, -1.0), {"rope", "theta = -1"});
}

}  // namespace
}  // namespace loom
