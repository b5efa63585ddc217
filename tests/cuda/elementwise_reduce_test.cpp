// Element-wise, conversion and sum-reduction CUDA kernels against their CPU
// twins: awkward sizes (1, 3, 17, 65, 4099, ~1M), broadcast and strided
// operands (stride 0, transposes), unaligned pointers (scalar path), bf16 and
// f32 storage, outputs poisoned with NaN first. Inputs are rounded to the
// storage dtype before the CPU twin sees them, so both sides start from the
// same numbers; the GPU computes in fp32 (sums in double) and rounds once, so
// a 16-bit result may differ by one rounding of the output (rtol 2^-8).
// Uploads and downloads are raw byte copies of contiguous buffers: the tests
// do not rely on Tensor::copy_ converting on the device.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/activation.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/reduce.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/reduce.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using namespace cuda_testing;  // tests/cuda/cuda_testing.h

// One rounding of a `dtype` output, relative (GPU math in fp32, rounded once).
double rounding(DType dtype) {
  return dtype == DType::bf16 ? std::ldexp(1.0, -8) : dtype == DType::f16 ? std::ldexp(1.0, -11) : 1e-6;
}

::testing::AssertionResult close(const Tensor& gpu_out, const Tensor& expected, DType dtype, double atol = 1e-30) {
  return testing::tensors_close(download(gpu_out), expected.to(DType::f64), rounding(dtype), atol);
}

const DType kDtypes[] = {DType::bf16, DType::f32};

TEST(CudaElementwise, BinaryOpsMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Case {
    Shape a, b;
  };
  const Case cases[] = {{{1}, {1}},         {{3, 7}, {3, 7}},  {{17, 65}, {17, 65}}, {{4099}, {4099}},
                        {{5, 1, 7}, {3, 1}}, {{2, 3, 65}, {65}}, {{1}, {17, 65}},      {{}, {3, 5}},
                        {{4, 1, 9}, {1, 6, 1}},
                        // Inner dims of 8k elements: the strided kernel by packs (aligned runs) with b one
                        // element per row, b a broadcast row, a one element per row, both broadcast outside.
                        {{6, 4, 16}, {6, 4, 1}}, {{3, 24}, {24}}, {{4, 1}, {4, 16}}, {{5, 1, 8}, {1, 3, 8}}};
  uint64_t seed = 500;
  for (DType dtype : kDtypes) {
    for (const Case& c : cases) {
      for (bool misalign : {false, true}) {
        for (auto op : {cpu::BinaryOp::add, cpu::BinaryOp::sub, cpu::BinaryOp::mul, cpu::BinaryOp::div}) {
          SCOPED_TRACE(::testing::Message() << dtype << " a " << shape_str(c.a) << " b " << shape_str(c.b) << " op "
                                            << static_cast<int>(op) << " misalign " << misalign);
          Tensor a = random_rounded(c.a, seed++, dtype);
          Tensor b = random_rounded(c.b, seed++, dtype);
          if (op == cpu::BinaryOp::div) {  // keep divisors away from zero
            float* p = b.data<float>();
            for (int64_t i = 0; i < b.numel(); ++i) p[i] = (p[i] < 0 ? -1.f : 1.f) * (0.5f + std::fabs(p[i]));
            b = b.to(dtype).to(DType::f32);
          }
          Shape shape = broadcast_shapes(c.a, c.b);
          Tensor expected = Tensor::empty(shape);
          cpu::binary(expected, a, b, op, cpu_stream());
          Tensor out = poisoned_upload(shape, dtype, misalign);
          cuda::binary(out, upload(a, dtype, misalign), upload(b, dtype), op, gpu_stream());
          EXPECT_TRUE(close(out, expected, dtype));
        }
      }
    }
  }
}

TEST(CudaElementwise, ScaleAndAxpyTakeStridedInputs) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 600;
  for (DType dtype : kDtypes) {
    for (Shape shape : {Shape{1}, Shape{3, 17}, Shape{65, 33}, Shape{4099}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " " << shape_str(shape));
      Tensor x = random_rounded(shape, seed++, dtype);
      Tensor expected = Tensor::empty(shape);
      cpu::scale(expected, x, -1.75, 0.5, cpu_stream());
      Tensor out = poisoned_upload(shape, dtype, true);
      cuda::scale(out, upload(x, dtype), -1.75, 0.5, gpu_stream());
      EXPECT_TRUE(close(out, expected, dtype)) << "scale";
      // In place.
      Tensor inplace = upload(x, dtype);
      cuda::scale(inplace, inplace, -1.75, 0.5, gpu_stream());
      EXPECT_TRUE(close(inplace, expected, dtype)) << "scale in place";
      // Transposed input (2-D shapes) and a broadcast (stride 0) input.
      if (shape.size() == 2) {
        Tensor xt = random_rounded({shape[1], shape[0]}, seed++, dtype);
        Tensor exp_t = Tensor::empty(shape);
        cpu::scale(exp_t, xt.transpose(0, 1), 3.0, 0.0, cpu_stream());
        Tensor out_t = poisoned_upload(shape, dtype);
        cuda::scale(out_t, upload(xt, dtype).transpose(0, 1), 3.0, 0.0, gpu_stream());
        EXPECT_TRUE(close(out_t, exp_t, dtype)) << "scale of a transpose";
        Tensor row = random_rounded({1, shape[1]}, seed++, dtype);
        Tensor exp_b = Tensor::empty(shape);
        cpu::scale(exp_b, row.expand(shape), 0.25, -1.0, cpu_stream());
        Tensor out_b = poisoned_upload(shape, dtype);
        cuda::scale(out_b, upload(row, dtype).expand(shape), 0.25, -1.0, gpu_stream());
        EXPECT_TRUE(close(out_b, exp_b, dtype)) << "scale of an expanded row";
        // axpy with a transposed x.
        Tensor y = random_rounded(shape, seed++, dtype);
        Tensor exp_y = y.clone();
        cpu::axpy(exp_y, xt.transpose(0, 1), -0.5, cpu_stream());
        Tensor yg = upload(y, dtype);
        cuda::axpy(yg, upload(xt, dtype).transpose(0, 1), -0.5, gpu_stream());
        EXPECT_TRUE(close(yg, exp_y, dtype)) << "axpy of a transpose";
      }
      // axpy: same dtype, and a bf16 x added into an f32 y (fp32 gradient buffer).
      for (DType xdtype : {dtype, DType::bf16}) {
        Tensor y = random_rounded(shape, seed++, DType::f32);
        Tensor xb = random_rounded(shape, seed++, xdtype);
        DType ydtype = xdtype == dtype ? dtype : DType::f32;
        y = y.to(ydtype).to(DType::f32);
        Tensor exp_y = y.clone();
        cpu::axpy(exp_y, xb, 2.5, cpu_stream());
        Tensor yg = upload(y, ydtype, true);
        cuda::axpy(yg, upload(xb, xdtype), 2.5, gpu_stream());
        EXPECT_TRUE(close(yg, exp_y, ydtype)) << "axpy x " << xdtype << " into y " << ydtype;
      }
    }
  }
}

TEST(CudaElementwise, SigmoidAndSiluMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 700;
  for (DType dtype : kDtypes) {
    for (Shape shape : {Shape{1}, Shape{3}, Shape{17, 65}, Shape{4099}, Shape{8, 1024}}) {
      for (bool misalign : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " " << shape_str(shape) << " misalign " << misalign);
        Tensor x = random_rounded(shape, seed++, dtype, 4.0), dy = random_rounded(shape, seed++, dtype);
        Tensor y_ref = Tensor::empty(shape), dx_ref = Tensor::empty(shape);
        Tensor xg = upload(x, dtype, misalign), dyg = upload(dy, dtype, misalign);
        // sigmoid: the backward takes the forward's output; give both sides the same rounded y.
        cpu::sigmoid_forward(y_ref, x, cpu_stream());
        Tensor y = poisoned_upload(shape, dtype, misalign);
        cuda::sigmoid_forward(y, xg, gpu_stream());
        EXPECT_TRUE(close(y, y_ref, dtype)) << "sigmoid";
        Tensor y_rounded = y_ref.to(dtype).to(DType::f32);
        cpu::sigmoid_backward(dx_ref, dy, y_rounded, cpu_stream());
        Tensor dx = poisoned_upload(shape, dtype, misalign);
        cuda::sigmoid_backward(dx, dyg, upload(y_rounded, dtype, misalign), gpu_stream());
        EXPECT_TRUE(close(dx, dx_ref, dtype, 1e-7)) << "sigmoid backward";
        cpu::silu_forward(y_ref, x, cpu_stream());
        cuda::silu_forward(y, xg, gpu_stream());
        EXPECT_TRUE(close(y, y_ref, dtype, 1e-7)) << "silu";
        cpu::silu_backward(dx_ref, dy, x, cpu_stream());
        cuda::silu_backward(dx, dyg, xg, gpu_stream());
        // 1 + x (1 - sigmoid(x)) cancels near x = -1.28: an ulp of difference in
        // exp (libm vs CUDA) or a fused multiply-add leaves ~1e-7 absolute there.
        EXPECT_TRUE(close(dx, dx_ref, dtype, 1e-6)) << "silu backward";
      }
    }
  }
}

TEST(CudaElementwise, CopyCastEqualsTheHostConversion) {
  LOOM_SKIP_WITHOUT_GPU();
  const DType all[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8};
  uint64_t seed = 800;
  for (DType from : all) {
    for (DType to : all) {
      for (Shape shape : {Shape{1}, Shape{3, 5}, Shape{17, 65}, Shape{4099}}) {
        SCOPED_TRACE(::testing::Message() << from << " -> " << to << " " << shape_str(shape));
        // Values valid for every dtype pair: 0..200 with fractions for floats (truncated by integer targets).
        Tensor v = testing::random_tensor(shape, seed++, DType::f64, 1.0);
        double* p = v.data<double>();
        for (int64_t i = 0; i < v.numel(); ++i) p[i] = std::fabs(p[i]) * 60.0 + 0.3;
        Tensor src_host = v.to(from);
        Tensor expected = src_host.to(to).to(DType::f64);  // host conversion
        for (bool misalign : {false, true}) {
          Tensor dst = poisoned_upload(shape, to, misalign);
          cuda::copy_cast(dst, upload(src_host, from, !misalign), gpu_stream());
          EXPECT_TENSOR_CLOSE(download(dst), expected, 0.0, 0.0) << "contiguous, misalign " << misalign;
        }
        if (shape.size() == 2) {
          // Strided source (a transpose) into a strided destination (every other column of a wider buffer).
          Tensor src_t = upload(src_host.transpose(0, 1).contiguous(), from).transpose(0, 1);
          Tensor wide = poisoned_upload({shape[0], 2 * shape[1]}, to);
          Tensor dst = wide.slice(1, 0, 2 * shape[1], 2);
          cuda::copy_cast(dst, src_t, gpu_stream());
          Tensor host_wide = wide.to(Device::cpu());
          Tensor got = host_wide.slice(1, 0, 2 * shape[1], 2).to(DType::f64);
          EXPECT_TENSOR_CLOSE(got, expected, 0.0, 0.0) << "strided";
          if (is_floating(to)) {  // the gaps stay poisoned
            Tensor gaps = host_wide.slice(1, 1, 2 * shape[1], 2).to(DType::f64);
            for (double g : gaps.to_vector<double>()) ASSERT_TRUE(std::isnan(g)) << "copy_cast wrote outside dst";
          }
        }
      }
    }
  }
}

TEST(CudaElementwise, FillWritesEveryElementOfTheView) {
  LOOM_SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8}) {
    for (int64_t n : {1, 3, 17, 65, 4099}) {
      SCOPED_TRACE(::testing::Message() << dtype << " n " << n);
      double value = is_floating(dtype) ? -2.7 : 7.0;
      Tensor expected = Tensor::full({n}, value, DType::f64).to(dtype).to(DType::f64);
      for (bool misalign : {false, true}) {
        Tensor t = poisoned_upload({n}, dtype, misalign);
        cuda::fill(t, value, gpu_stream());
        EXPECT_TENSOR_CLOSE(download(t), expected, 0.0, 0.0);
      }
      // A strided view: column 1 of an (n, 3) matrix; the other columns keep their values.
      Tensor m = upload(Tensor::full({n, 3}, 1.0, DType::f64), dtype);
      Tensor col = m.select(1, 1);
      cuda::fill(col, value, gpu_stream());
      Tensor host = m.to(Device::cpu()).to(DType::f64);
      EXPECT_TENSOR_CLOSE(host.select(1, 1).contiguous(), expected, 0.0, 0.0);
      EXPECT_TENSOR_CLOSE(host.select(1, 0).contiguous(), Tensor::ones({n}, DType::f64), 0.0, 0.0);
      EXPECT_TENSOR_CLOSE(host.select(1, 2).contiguous(), Tensor::ones({n}, DType::f64), 0.0, 0.0);
    }
  }
}

// ---- reductions ----

// Sums are formed in double on both sides; the f32 result then differs at most by its own rounding.
::testing::AssertionResult sum_close(const Tensor& gpu_out, const Tensor& expected, DType out_dtype) {
  return testing::tensors_close(download(gpu_out), expected.to(DType::f64), rounding(out_dtype), 1e-6);
}

TEST(CudaReduce, SumAllMatchesTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 900;
  for (DType dtype : kDtypes) {
    for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{17}, int64_t{65}, int64_t{4099}, (int64_t{1} << 20) + 3}) {
      for (bool misalign : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " n " << n << " misalign " << misalign);
        Tensor x = random_rounded({n}, seed++, dtype);
        Tensor expected = Tensor::empty({});
        cpu::sum_all(expected, x, cpu_stream());
        for (DType out_dtype : {dtype, DType::f32}) {
          Tensor out = poisoned_upload({}, out_dtype);
          cuda::sum_all(out, upload(x, dtype, misalign), gpu_stream());
          EXPECT_TRUE(sum_close(out, expected, out_dtype)) << "out " << out_dtype;
        }
      }
    }
  }
}

TEST(CudaReduce, SumDimMatchesTheCpuTwinAndIsReproducible) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Case {
    Shape shape;
    int64_t dim;
  };
  const Case cases[] = {{{3, 5, 7}, 0},    {{3, 5, 7}, 1},     {{3, 5, 7}, 2},      {{17, 65}, 0},
                        {{17, 65}, 1},     {{2, 4096, 8}, 1},  {{1000, 64}, 0},     {{5, 100003}, 1},
                        {{3, 70000}, 0},   {{0, 5}, 0},        {{1, 1}, 1},         {{9, 3, 1024}, 1},
                        // Last-dim sums: a warp per segment up to 1024 elements (vector and element
                        // loads), a block per segment past it.
                        {{2000, 128}, 1},  {{7, 1024}, 1},     {{4, 1025}, 1},      {{33, 3, 5}, 2}};
  uint64_t seed = 1000;
  for (DType dtype : kDtypes) {
    for (const Case& c : cases) {
      SCOPED_TRACE(::testing::Message() << dtype << " " << shape_str(c.shape) << " dim " << c.dim);
      Tensor x = random_rounded(c.shape, seed++, dtype);
      Shape out_shape = c.shape;
      out_shape.erase(out_shape.begin() + c.dim);
      Tensor expected = Tensor::empty(out_shape);
      cpu::sum_dim(expected, x, c.dim, cpu_stream());
      Tensor xg = upload(x, dtype);
      Tensor out = poisoned_upload(out_shape, DType::f32);
      cuda::sum_dim(out, xg, c.dim, gpu_stream());
      EXPECT_TRUE(sum_close(out, expected, DType::f32));
      Tensor again = poisoned_upload(out_shape, DType::f32);
      cuda::sum_dim(again, xg, c.dim, gpu_stream());
      EXPECT_TENSOR_CLOSE(download(again), download(out), 0.0, 0.0) << "second run differs";
      Tensor same_dtype = poisoned_upload(out_shape, dtype, true);
      cuda::sum_dim(same_dtype, xg, c.dim, gpu_stream());
      EXPECT_TRUE(sum_close(same_dtype, expected, dtype)) << "out " << dtype;
    }
  }
}

TEST(CudaReduce, SumToHandlesEveryBroadcastPattern) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Case {
    Shape x, out;
  };
  const Case cases[] = {{{4, 5, 6}, {6}},       {{4, 5, 6}, {5, 1}},  {{4, 5, 6}, {4, 1, 6}}, {{4, 5, 6}, {1, 5, 1}},
                        {{4, 5, 6}, {}},        {{4, 5, 6}, {4, 5, 6}}, {{65, 17}, {1, 17}},   {{3, 1, 4099}, {4099}},
                        {{2, 3, 4, 5}, {3, 1, 5}}, {{300, 96}, {96}}, {{0, 5}, {5}}};
  uint64_t seed = 1100;
  for (DType dtype : kDtypes) {
    for (const Case& c : cases) {
      SCOPED_TRACE(::testing::Message() << dtype << " " << shape_str(c.x) << " -> " << shape_str(c.out));
      Tensor x = random_rounded(c.x, seed++, dtype);
      Tensor expected = Tensor::empty(c.out, DType::f64);  // summed in double, like the CUDA kernel
      cpu::sum_to(expected, x.to(DType::f64), cpu_stream());
      Tensor out = poisoned_upload(c.out, DType::f32);
      cuda::sum_to(out, upload(x, dtype), gpu_stream());
      EXPECT_TRUE(sum_close(out, expected, DType::f32)) << "contiguous x";
      if (c.x.size() >= 2) {  // the same values through a transposed (non-contiguous) view
        int64_t last = static_cast<int64_t>(c.x.size()) - 1;
        Tensor xt = upload(x.transpose(0, last).contiguous(), dtype).transpose(0, last);
        Tensor out_t = poisoned_upload(c.out, dtype);
        cuda::sum_to(out_t, xt, gpu_stream());
        EXPECT_TRUE(sum_close(out_t, expected, dtype)) << "transposed x";
      }
    }
  }
  // An expanded (stride 0) input: each element counted once per broadcast copy.
  Tensor row = random_rounded({1, 7}, 1199, DType::f32);
  Tensor expected = Tensor::empty({7});
  cpu::sum_to(expected, row.expand({5, 7}), cpu_stream());
  Tensor out = poisoned_upload({7}, DType::f32);
  cuda::sum_to(out, upload(row, DType::f32).expand({5, 7}), gpu_stream());
  EXPECT_TRUE(sum_close(out, expected, DType::f32)) << "expanded x";
}

TEST(CudaElementwiseReduce, BadArgumentsAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor a = Tensor::zeros({2, 3}, DType::f32, gpu()), b = Tensor::zeros({2, 3}, DType::bf16, gpu());
  Tensor out = Tensor::zeros({2, 3}, DType::f32, gpu());
  try {
    cuda::binary(out, a, b, cpu::BinaryOp::add, gpu_stream());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16"), std::string::npos) << e.what();
  }
  Tensor wrong = Tensor::zeros({4}, DType::f32, gpu());
  try {
    cuda::sum_dim(wrong, a, 1, gpu_stream());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(4,)"), std::string::npos) << e.what();
  }
  Tensor host = Tensor::zeros({2, 3});
  EXPECT_THROW(cuda::scale(out, host, 1.0, 0.0, gpu_stream()), Error);
  EXPECT_THROW(cuda::copy_cast(wrong, a, gpu_stream()), Error);
  Tensor ints = Tensor::zeros({2, 3}, DType::i64, gpu());
  EXPECT_THROW(cuda::sigmoid_forward(ints, ints, gpu_stream()), Error);
}

}  // namespace
}  // namespace loom
