// Shared test helpers: tensor comparison that reports the worst element,
// finite-difference gradient checks in f64, random and non-contiguous inputs,
// and the GPU skip reason.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "framework/autograd.h"
#include "framework/random.h"
#include "framework/tensor.h"

namespace loom::testing {

// Passes when |actual - expected| <= atol + rtol * |expected| everywhere (and
// shapes match); otherwise reports the worst element: its index, both values,
// the difference, and how many elements failed. NaN anywhere fails.
::testing::AssertionResult tensors_close(const Tensor& actual, const Tensor& expected, double rtol, double atol);
#define EXPECT_TENSOR_CLOSE(actual, expected, rtol, atol) \
  EXPECT_TRUE(::loom::testing::tensors_close((actual), (expected), (rtol), (atol)))
#define ASSERT_TENSOR_CLOSE(actual, expected, rtol, atol) \
  ASSERT_TRUE(::loom::testing::tensors_close((actual), (expected), (rtol), (atol)))

// Fresh normal random tensor (seeded; different seeds give different data).
Tensor random_tensor(const Shape& shape, uint64_t seed, DType dtype = DType::f64, double scale = 1.0);
// Uniform random integers in [0, high) as i64.
Tensor random_indices(const Shape& shape, int64_t high, uint64_t seed);
// Same values as `t` (f64/f32, CPU) but a non-contiguous view: each element is
// stored every other slot of a larger buffer, and the rest is filled with NaN.
Tensor non_contiguous(const Tensor& t);

using GradFn = std::function<std::vector<Variable>(const std::vector<Variable>& inputs)>;
struct GradCheckOptions {
  double eps = 1e-6;
  double rtol = 1e-5;
  double atol = 1e-8;
  uint64_t seed = 1234;
  // Inputs (by index) that get no gradient check (e.g. index tensors are skipped automatically).
  std::vector<size_t> skip;
};
// Checks analytic gradients of every floating input of `fn` against central
// finite differences of L = sum_k <out_k, R_k> for fixed random R_k. Inputs
// must be f64 CPU tensors (they may be non-contiguous).
::testing::AssertionResult gradcheck(const GradFn& fn, const std::vector<Tensor>& inputs,
                                     const GradCheckOptions& options = {});
#define EXPECT_GRADCHECK(...) EXPECT_TRUE(::loom::testing::gradcheck(__VA_ARGS__))

// A fresh directory under /tmp (named after `tag`), removed with its contents at scope end.
class TempDir {
 public:
  explicit TempDir(const std::string& tag = "loom_test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// Why GPU tests cannot run here ("" when a GPU is usable).
std::string gpu_skip_reason();
#define LOOM_SKIP_WITHOUT_GPU()                                              \
  do {                                                                       \
    std::string loom_reason_ = ::loom::testing::gpu_skip_reason();           \
    if (!loom_reason_.empty()) GTEST_SKIP() << "GPU test skipped: " << loom_reason_; \
  } while (0)

}  // namespace loom::testing
