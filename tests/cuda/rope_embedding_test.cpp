// RoPE and embedding CUDA kernels against their CPU twins: odd shapes,
// per-token and per-batch positions (including positions near a million, where
// an fp32 angle would be visibly wrong), repeated ids, bf16 and f32 storage,
// and the id range check.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/embedding.h"
#include "kernels/cpu/rope.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/rope.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using cuda_testing::cpu_stream;
using cuda_testing::gpu;
using cuda_testing::gpu_stream;

double ulp_of(DType d) { return d == DType::bf16 ? std::ldexp(1.0, -7) : 2e-6; }

TEST(CudaRope, MatchesTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 300;
  struct Case {
    int64_t b, t, h, d;
    bool per_batch;
    int64_t offset;
  };
  for (DType dtype : {DType::bf16, DType::f32}) {
    for (Case c : {Case{1, 1, 1, 2, false, 0}, Case{2, 17, 3, 64, false, 0}, Case{2, 5, 4, 128, true, 999983},
                   Case{3, 33, 2, 10, true, 7}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " B " << c.b << " T " << c.t << " H " << c.h << " D " << c.d
                                        << " offset " << c.offset);
      Shape shape{c.b, c.t, c.h, c.d};
      Tensor x = testing::random_tensor(shape, seed++, DType::f32).to(dtype).to(DType::f32);
      Tensor pos = testing::random_indices(c.per_batch ? Shape{c.b, c.t} : Shape{c.t}, 1000, seed++);
      int64_t* p = pos.data<int64_t>();
      for (int64_t i = 0; i < pos.numel(); ++i) p[i] += c.offset;
      Tensor y_ref = Tensor::empty(shape), dx_ref = Tensor::empty(shape);
      cpu::rope_forward(y_ref, x, pos, 10000.0, cpu_stream());
      cpu::rope_backward(dx_ref, x, pos, 10000.0, cpu_stream());
      Tensor xg = x.to(dtype).to(gpu()), pg = pos.to(gpu());
      Tensor y = Tensor::full(shape, NAN, dtype, gpu()), dx = Tensor::full(shape, NAN, dtype, gpu());
      cuda::rope_forward(y, xg, pg, 10000.0, gpu_stream());
      cuda::rope_backward(dx, xg, pg, 10000.0, gpu_stream());
      EXPECT_TENSOR_CLOSE(y.to(Device::cpu()).to(DType::f32), y_ref, 1e-5, 4 * ulp_of(dtype));
      EXPECT_TENSOR_CLOSE(dx.to(Device::cpu()).to(DType::f32), dx_ref, 1e-5, 4 * ulp_of(dtype));
    }
  }
}

TEST(CudaEmbedding, ForwardAndDeterministicBackwardMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 400;
  for (DType dtype : {DType::bf16, DType::f32}) {
    for (auto [v, c, n] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {11, 7, 50}, {257, 128, 1000},
                           {5, 65, 300}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " V " << v << " C " << c << " N " << n);
      Tensor weight = testing::random_tensor({v, c}, seed++, DType::f32).to(dtype).to(DType::f32);
      Tensor ids = testing::random_indices({n}, v, seed++);  // many repeats when V is small
      Tensor grad = testing::random_tensor({n, c}, seed++, DType::f32).to(dtype).to(DType::f32);
      Tensor out_ref = Tensor::empty({n, c}), gw_ref = Tensor::zeros({v, c});
      cpu::embedding_forward(out_ref, weight, ids, cpu_stream());
      cpu::embedding_backward(gw_ref, grad, ids, cpu_stream());
      for (DType id_dtype : {DType::i64, DType::i32}) {
        Tensor ig = ids.to(id_dtype).to(gpu());
        Tensor out = Tensor::full({n, c}, NAN, dtype, gpu());
        cuda::embedding_forward(out, weight.to(dtype).to(gpu()), ig, gpu_stream());
        EXPECT_TENSOR_CLOSE(out.to(Device::cpu()).to(DType::f32), out_ref, 0, 0);
        Tensor gw = Tensor::zeros({v, c}, DType::f32, gpu());
        cuda::embedding_backward(gw, grad.to(dtype).to(gpu()), ig, gpu_stream());
        Tensor first = gw.to(Device::cpu());
        EXPECT_TENSOR_CLOSE(first, gw_ref, 1e-5, 1e-5);
        // Deterministic: a second run gives the same bits.
        Tensor gw2 = Tensor::zeros({v, c}, DType::f32, gpu());
        cuda::embedding_backward(gw2, grad.to(dtype).to(gpu()), ig, gpu_stream());
        EXPECT_TENSOR_CLOSE(gw2.to(Device::cpu()), first, 0, 0);
      }
    }
  }
}

TEST(CudaEmbedding, OutOfRangeIdsAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor weight = Tensor::zeros({10, 4}, DType::bf16, gpu());
  Tensor ids = Tensor::from_vector<int64_t>({1, 2, 12, 3}, {4}).to(gpu());
  Tensor out = Tensor::zeros({4, 4}, DType::bf16, gpu());
  try {
    cuda::embedding_forward(out, weight, ids, gpu_stream());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("id 12 at position 2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[0, 10)"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace loom
