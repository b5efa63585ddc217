// rms_norm: forward against a hand-written reference, gradients by finite
// differences (odd sizes, non-contiguous inputs), threaded path, errors.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops_nn.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::GradCheckOptions;
using testing::non_contiguous;
using testing::random_tensor;
using testing::values;

// y[r, c] = x[r, c] / sqrt(mean_c x[r, :]^2 + eps) * w[c], written out directly.
Tensor naive_rms_norm(const Tensor& x, const Tensor& w, double eps) {
  std::vector<double> xv = values(x), wv = values(w), y(xv.size());
  int64_t C = w.numel(), N = x.numel() / C;
  for (int64_t r = 0; r < N; ++r) {
    double ms = 0.0;
    for (int64_t c = 0; c < C; ++c) ms += xv[r * C + c] * xv[r * C + c] / static_cast<double>(C);
    for (int64_t c = 0; c < C; ++c) y[r * C + c] = xv[r * C + c] / std::sqrt(ms + eps) * wv[c];
  }
  return Tensor::from_vector(y, x.shape());
}

TEST(RmsNorm, ForwardMatchesReference) {
  for (Shape shape : {Shape{3, 17}, Shape{2, 3, 65}, Shape{1, 1}}) {
    Tensor x = random_tensor(shape, 1), w = random_tensor({shape.back()}, 2);
    Variable y = rms_norm(Variable(x), Variable(w), 1e-5);
    EXPECT_EQ(y.shape(), shape);
    EXPECT_TENSOR_CLOSE(y.data(), naive_rms_norm(x, w, 1e-5), 1e-12, 1e-12);
  }
}

TEST(RmsNorm, Float32MatchesFloat64) {
  Tensor x = random_tensor({5, 33}, 3), w = random_tensor({33}, 4);
  Variable y = rms_norm(Variable(x.to(DType::f32)), Variable(w.to(DType::f32)), 1e-6);
  EXPECT_EQ(y.dtype(), DType::f32);
  EXPECT_TENSOR_CLOSE(y.data(), naive_rms_norm(x, w, 1e-6), 1e-5, 1e-6);
}

TEST(RmsNorm, EpsDominatesTinyRows) {
  Tensor x = Tensor::zeros({2, 3}, DType::f64), w = Tensor::ones({3}, DType::f64);
  Variable y = rms_norm(Variable(x), Variable(w), 1e-6);
  for (double v : values(y.data())) EXPECT_EQ(v, 0.0);
}

TEST(RmsNorm, GradCheck) {
  auto fn = [](const std::vector<Variable>& in) { return std::vector<Variable>{rms_norm(in[0], in[1], 1e-5)}; };
  EXPECT_GRADCHECK(fn, {random_tensor({3, 17}, 5), random_tensor({17}, 6)});
  EXPECT_GRADCHECK(fn, {random_tensor({17, 1}, 7), random_tensor({1}, 8)});
  EXPECT_GRADCHECK(fn, {random_tensor({1, 3, 65}, 9), random_tensor({65}, 10)});
}

TEST(RmsNorm, GradCheckNonContiguous) {
  auto fn = [](const std::vector<Variable>& in) { return std::vector<Variable>{rms_norm(in[0], in[1], 1e-5)}; };
  EXPECT_GRADCHECK(fn, {non_contiguous(random_tensor({3, 3, 17}, 11)), non_contiguous(random_tensor({17}, 12))});
  // A transposed view: rows of the op are columns of the storage.
  Tensor xt = random_tensor({17, 3}, 13).transpose(0, 1);  // (3, 17), non-contiguous
  EXPECT_GRADCHECK(fn, {xt, random_tensor({17}, 14)});
}

TEST(RmsNorm, ThreadedPathGradients) {
  // rows * C above the kernel's threading threshold: dw is reduced from per-thread partials.
  auto fn = [](const std::vector<Variable>& in) { return std::vector<Variable>{rms_norm(in[0], in[1], 1e-5)}; };
  EXPECT_TRUE(testing::spot_gradcheck(fn, {random_tensor({260, 129}, 15), random_tensor({129}, 16)}, 12, 17));
}

TEST(RmsNorm, ErrorsNameTheValues) {
  Variable x(random_tensor({3, 4}, 1)), w(random_tensor({5}, 2));
  EXPECT_ERROR_MENTIONS(rms_norm(x, w, 1e-5), {"rms_norm", "(5,)", "(3, 4)"});
  Variable w32(random_tensor({4}, 3, DType::f32));
  EXPECT_ERROR_MENTIONS(rms_norm(x, w32, 1e-5), {"rms_norm", "f64", "f32"});
  Variable xi(Tensor::zeros({3, 4}, DType::i64));
  EXPECT_ERROR_MENTIONS(rms_norm(xi, w, 1e-5), {"rms_norm", "i64"});
  EXPECT_ERROR_MENTIONS(rms_norm(x, Variable(random_tensor({4}, 4)), -1.0), {"eps", "-1"});
}

}  // namespace
}  // namespace loom
