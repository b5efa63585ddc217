// RMSNorm, SwiGLU and sigmoid-gate CUDA kernels against their CPU twins: awkward widths
// (1, 7, 65, 1000, 4099 and vector-friendly 64, 4096), unaligned pointers (the
// scalar path), bf16 and f32 storage; outputs poisoned with NaN first. The
// tolerance is one unit in the last place of the output dtype at the largest
// expected magnitude (the GPU computes in fp32 and rounds once).
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/activation.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cuda/activation.h"
#include "kernels/cuda/rmsnorm.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using cuda_testing::cpu_stream;
using cuda_testing::gpu_stream;

// A contiguous CUDA tensor of `dtype` holding `values`; `misalign` shifts its
// start by one element so that 16-byte vector access is impossible.
Tensor to_gpu(const Tensor& values, DType dtype, bool misalign) {
  Tensor storage = Tensor::full({values.numel() + 1}, NAN, dtype, Device::cuda(0));
  Tensor t = storage.narrow(0, misalign ? 1 : 0, values.numel()).view(values.shape());
  t.copy_(values.to(dtype));
  return t;
}

Tensor poisoned(const Shape& shape, DType dtype, bool misalign) {
  return to_gpu(Tensor::full(shape, NAN, DType::f32), dtype, misalign);
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (double v : t.to_vector<double>()) m = std::max(m, std::fabs(v));
  return m;
}

// Tolerance: 1 ulp of `dtype` at the largest magnitude of `expected`, plus relative slack for fp32 order.
::testing::AssertionResult close(const Tensor& gpu, const Tensor& expected, DType dtype) {
  double ulp = dtype == DType::bf16 ? std::ldexp(1.0, -7) : dtype == DType::f16 ? std::ldexp(1.0, -10) : 1e-6;
  return testing::tensors_close(gpu.to(Device::cpu()).to(DType::f32), expected, 1e-5, ulp * std::max(1.0, max_abs(expected)));
}

Tensor abs_of(const Tensor& t) {
  std::vector<double> v = t.to_vector<double>();
  for (double& e : v) e = std::fabs(e);
  return Tensor::from_vector(v, t.shape());
}

struct Shape2 {
  int64_t rows, cols;
};
const Shape2 kShapes[] = {{1, 1}, {3, 7}, {17, 64}, {5, 65}, {9, 1000}, {2, 4096}, {3, 4099}, {130, 96}};

TEST(CudaRmsNorm, ForwardAndBackwardMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 100;
  for (DType dtype : {DType::bf16, DType::f32}) {
    for (const Shape2& sh : kShapes) {
      for (bool misalign : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " rows " << sh.rows << " cols " << sh.cols << " misalign " << misalign);
        Shape shape{sh.rows, sh.cols};
        // Inputs rounded to the storage dtype so both sides see the same numbers.
        Tensor x = testing::random_tensor(shape, seed++, DType::f32).to(dtype).to(DType::f32);
        Tensor w = testing::random_tensor({sh.cols}, seed++, DType::f32, 0.5).to(dtype).to(DType::f32);
        Tensor dy = testing::random_tensor(shape, seed++, DType::f32).to(dtype).to(DType::f32);
        Tensor y_ref = Tensor::empty(shape), rstd_ref = Tensor::empty({sh.rows});
        cpu::rmsnorm_forward(y_ref, rstd_ref, x, w, 1e-5, cpu_stream());
        Tensor dx_ref = Tensor::empty(shape), dw_ref = Tensor::empty({sh.cols});
        cpu::rmsnorm_backward(dx_ref, dw_ref, dy, x, w, rstd_ref, cpu_stream());

        Tensor xg = to_gpu(x, dtype, misalign), wg = to_gpu(w, dtype, misalign), dyg = to_gpu(dy, dtype, misalign);
        Tensor y = poisoned(shape, dtype, misalign), rstd = poisoned({sh.rows}, DType::f32, false);
        cuda::rmsnorm_forward(y, rstd, xg, wg, 1e-5, gpu_stream());
        EXPECT_TRUE(close(y, y_ref, dtype)) << "y";
        EXPECT_TRUE(close(rstd, rstd_ref, DType::f32)) << "rstd";
        Tensor dx = poisoned(shape, dtype, misalign), dw = poisoned({sh.cols}, DType::f32, false);
        cuda::rmsnorm_backward(dx, dw, dyg, xg, wg, rstd, gpu_stream());
        EXPECT_TRUE(close(dx, dx_ref, dtype)) << "dx";
        EXPECT_TRUE(testing::tensors_close(dw.to(Device::cpu()), dw_ref, 1e-4, 1e-5 * std::max(1.0, max_abs(dw_ref))))
            << "dw";
      }
    }
  }
}

TEST(CudaSwiglu, ForwardAndBackwardMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 200;
  for (DType dtype : {DType::bf16, DType::f32}) {
    for (const Shape2& sh : kShapes) {
      for (bool misalign : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " rows " << sh.rows << " cols " << sh.cols << " misalign " << misalign);
        Shape shape{sh.rows, sh.cols};
        Tensor gate = testing::random_tensor(shape, seed++, DType::f32, 2.0).to(dtype).to(DType::f32);
        Tensor up = testing::random_tensor(shape, seed++, DType::f32).to(dtype).to(DType::f32);
        Tensor dout = testing::random_tensor(shape, seed++, DType::f32).to(dtype).to(DType::f32);
        Tensor out_ref = Tensor::empty(shape), dgate_ref = Tensor::empty(shape), dup_ref = Tensor::empty(shape);
        cpu::swiglu_forward(out_ref, gate, up, cpu_stream());
        cpu::swiglu_backward(dgate_ref, dup_ref, dout, gate, up, cpu_stream());
        Tensor gg = to_gpu(gate, dtype, misalign), ug = to_gpu(up, dtype, misalign), dg = to_gpu(dout, dtype, misalign);
        Tensor out = poisoned(shape, dtype, misalign);
        cuda::swiglu_forward(out, gg, ug, gpu_stream());
        EXPECT_TRUE(close(out, out_ref, dtype)) << "out";
        Tensor dgate = poisoned(shape, dtype, misalign), dup = poisoned(shape, dtype, misalign);
        cuda::swiglu_backward(dgate, dup, dg, gg, ug, gpu_stream());
        EXPECT_TRUE(close(dgate, dgate_ref, dtype)) << "dgate";
        EXPECT_TRUE(close(dup, dup_ref, dtype)) << "dup";
      }
    }
  }
}

// x (rows, cols) gated by z per element (span 1) or per row (span cols); the reference runs in f64 on
// the same rounded inputs. dz of a row sums cols products in fp32 on the GPU: its bound adds 2^-16 of
// the row's g (1 - g) sum |dy x| to the output rounding.
TEST(CudaSigmoidGate, ForwardAndBackwardMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 300;
  for (DType dtype : {DType::bf16, DType::f32}) {
    for (const Shape2& sh : kShapes) {
      for (bool per_row : {false, true}) {
        for (bool misalign : {false, true}) {
          SCOPED_TRACE(::testing::Message() << dtype << " rows " << sh.rows << " cols " << sh.cols << " per_row "
                                            << per_row << " misalign " << misalign);
          Shape shape{sh.rows, sh.cols}, zshape = per_row ? Shape{sh.rows} : shape;
          const int64_t span = per_row ? sh.cols : 1;
          Tensor x = testing::random_tensor(shape, seed++, DType::f32).to(dtype).to(DType::f64);
          Tensor z = testing::random_tensor(zshape, seed++, DType::f32, 3.0).to(dtype).to(DType::f64);
          Tensor dy = testing::random_tensor(shape, seed++, DType::f32).to(dtype).to(DType::f64);
          Tensor y_ref = Tensor::empty(shape, DType::f64), dx_ref = Tensor::empty(shape, DType::f64);
          Tensor dz_ref = Tensor::empty(zshape, DType::f64);
          cpu::sigmoid_gate_forward(y_ref, x, z, span, cpu_stream());
          cpu::sigmoid_gate_backward(dx_ref, dz_ref, dy, x, z, span, cpu_stream());
          // Largest g (1 - g) sum |dy x| of a row.
          Tensor mag_x = Tensor::empty(shape, DType::f64), mag = Tensor::empty(zshape, DType::f64);
          cpu::sigmoid_gate_backward(mag_x, mag, abs_of(dy), abs_of(x), z, span, cpu_stream());

          Tensor xg = to_gpu(x, dtype, misalign), zg = to_gpu(z, dtype, misalign), dyg = to_gpu(dy, dtype, misalign);
          Tensor y = poisoned(shape, dtype, misalign);
          cuda::sigmoid_gate_forward(y, xg, zg, span, gpu_stream());
          EXPECT_TRUE(close(y, y_ref.to(DType::f32), dtype)) << "y";
          Tensor dx = poisoned(shape, dtype, misalign), dz = poisoned(zshape, dtype, misalign);
          cuda::sigmoid_gate_backward(dx, dz, dyg, xg, zg, span, gpu_stream());
          EXPECT_TRUE(close(dx, dx_ref.to(DType::f32), dtype)) << "dx";
          const double ulp = dtype == DType::bf16 ? std::ldexp(1.0, -7) : 1e-6;
          EXPECT_TRUE(testing::tensors_close(dz.to(Device::cpu()).to(DType::f64), dz_ref, 1e-5,
                                             ulp * std::max(1.0, max_abs(dz_ref)) + std::ldexp(max_abs(mag), -16)))
              << "dz";
        }
      }
    }
  }
}

TEST(CudaKernels, BadArgumentsAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor x = Tensor::zeros({2, 8}, DType::bf16, Device::cuda(0)), w = Tensor::zeros({7}, DType::bf16, Device::cuda(0));
  Tensor y = Tensor::zeros({2, 8}, DType::bf16, Device::cuda(0)), r = Tensor::zeros({2}, DType::f32, Device::cuda(0));
  try {
    cuda::rmsnorm_forward(y, r, x, w, 1e-5, gpu_stream());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(7,)"), std::string::npos) << e.what();
  }
  Tensor host = Tensor::zeros({2, 8}, DType::bf16);
  EXPECT_THROW(cuda::swiglu_forward(y, host, x, gpu_stream()), Error);
  Tensor z = Tensor::zeros({3}, DType::bf16, Device::cuda(0));
  try {
    cuda::sigmoid_gate_forward(y, x, z, 8, gpu_stream());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(3,)"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loom
