// cuBLASLt GEMM against its CPU twin (cpu::gemm) on awkward shapes: odd and
// non-multiple-of-8 sizes, transposes, batches, a broadcast operand, bf16 and
// f32 outputs, beta accumulation. Outputs are poisoned (NaN) before each run.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/matmul.h"
#include "kernels/cuda/gemm.h"
#include "tests/testing.h"

namespace loom {
namespace {

struct Case {
  Shape batch;  // c's batch dims
  int64_t m, n, k;
  bool trans_a, trans_b, broadcast_b;
  DType in, out;
};

std::string describe(const Case& c) {
  return fmt::format("batch {} M {} N {} K {} ta {} tb {} bcast {} {}->{}", shape_str(c.batch), c.m, c.n, c.k,
                     c.trans_a, c.trans_b, c.broadcast_b, dtype_name(c.in), dtype_name(c.out));
}

Shape with_batch(const Shape& batch, int64_t r, int64_t c) {
  Shape s = batch;
  s.push_back(r);
  s.push_back(c);
  return s;
}

TEST(CudaGemm, MatchesTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  Stream& gpu = Stream::default_for(Device::cuda(0));
  Stream& cpu = Stream::default_for(Device::cpu());
  std::vector<Case> cases = {
      {{}, 1, 1, 1, false, false, false, DType::bf16, DType::f32},
      {{}, 17, 33, 65, false, false, false, DType::bf16, DType::f32},
      {{}, 17, 33, 65, true, false, false, DType::bf16, DType::bf16},
      {{}, 65, 17, 33, false, true, false, DType::bf16, DType::f32},
      {{}, 3, 5, 7, true, true, false, DType::f32, DType::f32},
      {{4}, 31, 9, 130, false, true, false, DType::bf16, DType::f32},
      {{2, 3}, 13, 24, 40, false, false, true, DType::bf16, DType::bf16},
      {{}, 256, 384, 512, false, true, false, DType::bf16, DType::f32},
      {{}, 129, 1000, 77, false, false, false, DType::f16, DType::f32},
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c));
    Shape a_shape = with_batch(c.batch, c.trans_a ? c.k : c.m, c.trans_a ? c.m : c.k);
    Shape b_shape = with_batch(c.broadcast_b ? Shape{} : c.batch, c.trans_b ? c.n : c.k, c.trans_b ? c.k : c.n);
    Shape c_shape = with_batch(c.batch, c.m, c.n);
    // Inputs rounded to the GPU dtype, so both sides multiply the same numbers.
    Tensor a = testing::random_tensor(a_shape, seed++, DType::f32).to(c.in).to(DType::f32);
    Tensor b = testing::random_tensor(b_shape, seed++, DType::f32).to(c.in).to(DType::f32);
    Tensor c0 = testing::random_tensor(c_shape, seed++, DType::f32).to(c.out).to(DType::f32);
    for (double beta : {0.0, 0.5}) {
      Tensor expected = c0.clone();
      cpu::gemm(expected, a, b, c.trans_a, c.trans_b, 1.25, beta, cpu);
      Tensor out = beta == 0.0 ? Tensor::full(c_shape, NAN, c.out, Device::cuda(0)) : c0.to(c.out).to(Device::cuda(0));
      cuda::gemm(out, a.to(c.in).to(Device::cuda(0)), b.to(c.in).to(Device::cuda(0)), c.trans_a, c.trans_b, 1.25,
                 beta, gpu);
      Tensor got = out.to(Device::cpu()).to(DType::f32);
      // fp32 accumulation in another order: ~K ulps of f32; a bf16/f16 output adds its own rounding.
      double rtol = c.out == DType::f32 ? 1e-5 * std::max<int64_t>(1, c.k / 16) : 8e-3;
      EXPECT_TENSOR_CLOSE(got, expected, rtol, 1e-4) << "beta " << beta;
    }
  }
  EXPECT_GE(cuda::gemm_cached_algorithms(), cases.size());
}

TEST(CudaGemm, BadArgumentsNameTheShapes) {
  LOOM_SKIP_WITHOUT_GPU();
  Stream& gpu = Stream::default_for(Device::cuda(0));
  Tensor a = Tensor::zeros({4, 5}, DType::bf16, Device::cuda(0)), b = Tensor::zeros({6, 3}, DType::bf16, Device::cuda(0));
  Tensor c = Tensor::zeros({4, 3}, DType::f32, Device::cuda(0));
  try {
    cuda::gemm(c, a, b, false, false, 1.0, 0.0, gpu);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(4, 5)"), std::string::npos) << e.what();
  }
  Tensor i = Tensor::zeros({4, 5}, DType::i32, Device::cuda(0));
  EXPECT_THROW(cuda::gemm(c, i, i, false, true, 1.0, 0.0, gpu), Error);
}

}  // namespace
}  // namespace loom
