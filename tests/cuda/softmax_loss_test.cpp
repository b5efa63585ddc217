// Softmax and fused cross-entropy CUDA kernels against their
// CPU twins: awkward widths on both sides of the one-warp-per-row limit
// (2048) and of the 16-byte vector width, vocabularies up to 32K, ignored
// rows, i64 and i32 targets, bf16 and f32 storage, outputs poisoned with NaN.
// Tolerances: the CPU twin works in f32 with double sums; the GPU keeps fp32
// statistics whose exp-sums use the hardware exp2 (relative error ~2^-21 per
// term) and writes outputs with fp32 exponentials, so fp32 results agree to
// ~1e-6 relative (rtol 1e-5 leaves a margin of 10); a 16-bit output adds one
// rounding (2^-8 for bf16). Values that cancel (dy - sum(dy y), p - 1 at the
// target) get an absolute tolerance of a few fp32 ulps of their terms.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/softmax.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/softmax.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using namespace cuda_testing;  // tests/cuda/cuda_testing.h

constexpr double kF32Rtol = 1e-5;
double rtol_of(DType dtype) { return kF32Rtol + (dtype == DType::bf16 ? std::ldexp(1.0, -8) : 0.0); }

::testing::AssertionResult close(const Tensor& gpu_out, const Tensor& expected, DType dtype, double atol) {
  return testing::tensors_close(download(gpu_out), expected.to(DType::f64), rtol_of(dtype), atol);
}

struct RowShape {
  int64_t rows, cols;
};
const RowShape kRowShapes[] = {{1, 1}, {3, 7}, {17, 65}, {5, 2048}, {3, 2049}, {2, 4099}, {4, 8192}, {2, 10000}};
const DType kDtypes[] = {DType::bf16, DType::f32};

TEST(CudaSoftmax, ForwardAndBackwardMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 1300;
  for (DType dtype : kDtypes) {
    for (const RowShape& rs : kRowShapes) {
      for (bool misalign : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " rows " << rs.rows << " cols " << rs.cols << " misalign "
                                          << misalign);
        Shape shape{rs.rows, rs.cols};
        Tensor x = random_rounded(shape, seed++, dtype, 3.0), dy = random_rounded(shape, seed++, dtype);
        Tensor y_ref = Tensor::empty(shape);
        cpu::softmax_forward(y_ref, x, cpu_stream());
        Tensor y = poisoned_upload(shape, dtype, misalign);
        cuda::softmax_forward(y, upload(x, dtype, misalign), gpu_stream());
        EXPECT_TRUE(close(y, y_ref, dtype, 1e-12)) << "y";
        // The backward on both sides from the same (rounded) y.
        Tensor y_in = y_ref.to(dtype).to(DType::f32);
        Tensor dx_ref = Tensor::empty(shape);
        cpu::softmax_backward(dx_ref, dy, y_in, cpu_stream());
        Tensor dx = poisoned_upload(shape, dtype, misalign);
        cuda::softmax_backward(dx, upload(dy, dtype, misalign), upload(y_in, dtype, misalign), gpu_stream());
        EXPECT_TRUE(close(dx, dx_ref, dtype, 1e-6)) << "dx";
      }
    }
  }
}

TEST(CudaSoftmax, RowOfMinusInfinityGivesNanLikeTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor x = Tensor::from_vector<float>({-INFINITY, -INFINITY, -INFINITY, 1.f, 2.f, -INFINITY}, {2, 3});
  Tensor y_ref = Tensor::empty({2, 3});
  cpu::softmax_forward(y_ref, x, cpu_stream());
  Tensor y = poisoned_upload({2, 3}, DType::f32);
  cuda::softmax_forward(y, upload(x, DType::f32), gpu_stream());
  Tensor got = download(y);
  for (int64_t j = 0; j < 3; ++j) EXPECT_TRUE(std::isnan(got.to_vector<double>()[j])) << j;
  EXPECT_TENSOR_CLOSE(got.narrow(0, 1, 1), y_ref.narrow(0, 1, 1).to(DType::f64), kF32Rtol, 1e-12);
}

// Targets in [0, V) with every fifth row (and row 0 when `all_ignored`) set to ignore_index.
Tensor make_targets(int64_t rows, int64_t vocab, uint64_t seed, int64_t ignore_index, bool all_ignored) {
  Tensor t = testing::random_indices({rows}, vocab, seed);
  int64_t* p = t.data<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    if (all_ignored || r % 5 == 3) p[r] = ignore_index;
  return t;
}

TEST(CudaCrossEntropy, ForwardAndBackwardMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  const RowShape shapes[] = {{1, 1}, {3, 7}, {17, 65}, {5, 2048}, {7, 4099}, {4, 32003}, {3, 32768}, {9, 5}};
  const int64_t ignore = -100;
  uint64_t seed = 1500;
  for (DType dtype : kDtypes) {
    for (const RowShape& rs : shapes) {
      for (bool mean : {true, false}) {
        for (DType target_dtype : {DType::i64, DType::i32}) {
          bool all_ignored = rs.rows == 9;
          SCOPED_TRACE(::testing::Message() << dtype << " N " << rs.rows << " V " << rs.cols << " mean " << mean
                                            << " targets " << target_dtype << " all ignored " << all_ignored);
          Shape shape{rs.rows, rs.cols};
          Tensor logits = random_rounded(shape, seed++, dtype, 3.0);
          Tensor targets = make_targets(rs.rows, rs.cols, seed++, ignore, all_ignored);
          Tensor loss_ref = Tensor::empty({}), lse_ref = Tensor::empty({rs.rows});
          cpu::cross_entropy_forward(loss_ref, lse_ref, logits, targets, ignore, mean, cpu_stream());
          Tensor lg = upload(logits, dtype), tg = targets.to(target_dtype).to(gpu());
          Tensor loss = poisoned_upload({}, DType::f32), lse = poisoned_upload({rs.rows}, DType::f32);
          cuda::cross_entropy_forward(loss, lse, lg, tg, ignore, mean, gpu_stream());
          EXPECT_TENSOR_CLOSE(download(lse), lse_ref.to(DType::f64), kF32Rtol, 8e-6) << "lse";
          EXPECT_TENSOR_CLOSE(download(loss), loss_ref.to(DType::f64), kF32Rtol, 8e-6) << "loss";
          Tensor loss_again = poisoned_upload({}, DType::f32);
          cuda::cross_entropy_forward(loss_again, lse, lg, tg, ignore, mean, gpu_stream());
          EXPECT_TENSOR_CLOSE(download(loss_again), download(loss), 0.0, 0.0) << "loss is not reproducible";

          Tensor dloss = Tensor::scalar(0.75);
          Tensor dl_ref = Tensor::empty(shape);
          cpu::cross_entropy_backward(dl_ref, dloss, logits, targets, lse_ref, ignore, mean, cpu_stream());
          Tensor dl = poisoned_upload(shape, dtype);
          cuda::cross_entropy_backward(dl, upload(dloss, DType::f32), lg, tg, lse, ignore, mean, gpu_stream());
          EXPECT_TRUE(close(dl, dl_ref, dtype, 4e-6)) << "dlogits";
        }
      }
    }
  }
}

TEST(CudaCrossEntropy, LossInTheLogitsDtype) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor logits = random_rounded({6, 300}, 1600, DType::bf16, 2.0);
  Tensor targets = make_targets(6, 300, 1601, -1, false);
  Tensor loss_ref = Tensor::empty({}), lse_ref = Tensor::empty({6});
  cpu::cross_entropy_forward(loss_ref, lse_ref, logits, targets, -1, true, cpu_stream());
  Tensor loss = poisoned_upload({}, DType::bf16), lse = poisoned_upload({6}, DType::f32);
  cuda::cross_entropy_forward(loss, lse, upload(logits, DType::bf16), targets.to(gpu()), -1, true, gpu_stream());
  EXPECT_TENSOR_CLOSE(download(loss), loss_ref.to(DType::f64), rtol_of(DType::bf16), 8e-6);
}

TEST(CudaCrossEntropy, BadTargetsAndOperandsAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor logits = upload(random_rounded({4, 7}, 1700, DType::f32), DType::bf16);
  Tensor loss = Tensor::zeros({}, DType::f32, gpu()), lse = Tensor::zeros({4}, DType::f32, gpu());
  for (int64_t bad : {int64_t{7}, int64_t{-3}}) {
    Tensor targets = Tensor::from_vector<int64_t>({1, -100, bad, 2}, {4}).to(gpu());
    try {
      cuda::cross_entropy_forward(loss, lse, logits, targets, -100, true, gpu_stream());
      FAIL() << "expected an error for target " << bad;
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find("target " + std::to_string(bad) + " at row 2"), std::string::npos) << msg;
    }
    Tensor dl = Tensor::zeros({4, 7}, DType::bf16, gpu());
    EXPECT_THROW(cuda::cross_entropy_backward(dl, Tensor::ones({}, DType::f32, gpu()), logits, targets, lse, -100,
                                              true, gpu_stream()),
                 Error);
  }
  Tensor targets = Tensor::from_vector<int64_t>({1, 2, 3, 4}, {4}).to(gpu());
  Tensor lse16 = Tensor::zeros({4}, DType::bf16, gpu());
  try {
    cuda::cross_entropy_forward(loss, lse16, logits, targets, -100, true, gpu_stream());
    FAIL() << "expected an error for a bf16 lse";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lse must be f32"), std::string::npos) << e.what();
  }
  Tensor short_targets = Tensor::from_vector<int64_t>({1, 2, 3}, {3}).to(gpu());
  EXPECT_THROW(cuda::cross_entropy_forward(loss, lse, logits, short_targets, -100, true, gpu_stream()), Error);
}

}  // namespace
}  // namespace loom
