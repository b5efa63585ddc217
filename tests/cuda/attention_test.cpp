// CUDA attention kernels against the CPU twin (kernels/cpu/attention.h) in f32
// on the same inputs (bf16 cases round the inputs first, so both sides see the
// same numbers): T = 1, 17, 65, 130; D = 16, 64, 128 and an odd 40; GQA groups
// 1 and 4; full, causal and causal + S2 masks; queries offset against keys,
// shuffled (zigzag-like) positions, rows with no visible key; outputs poisoned
// with NaN first. The backward reference is fed the GPU's out and lse, so the
// gradients are compared on identical inputs. The GPU computes in fp32 and
// rounds each output once, so bf16 outputs get a relative tolerance of one
// bf16 rounding plus fp32 slack at the output's scale.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/s2_pattern.h"
#include "kernels/cuda/attention.h"
#include "tests/cuda/attention_testing.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using namespace cuda_testing;  // tests/cuda/cuda_testing.h

// GPU tensor (any dtype) against an f32 CPU reference.
::testing::AssertionResult close(const Tensor& gpu_tensor, const Tensor& expected, DType dtype) {
  return cuda_testing::close_to_reference(gpu_tensor, expected, dtype, 1e-4, 2e-5);
}


struct Case {
  int64_t B, T, S, H, Hkv, D;
  bool causal;
  bool s2;
  Positions positions = Positions::arange;
};

void check_case(const Case& c, DType dtype, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << dtype << " B " << c.B << " T " << c.T << " S " << c.S << " H " << c.H
                                    << " Hkv " << c.Hkv << " D " << c.D << " causal " << c.causal << " s2 " << c.s2
                                    << " positions " << static_cast<int>(c.positions));
  const Shape q_shape{c.B, c.T, c.H, c.D}, kv_shape{c.B, c.S, c.Hkv, c.D}, row_shape{c.B, c.H, c.T};
  Tensor q = random_rounded(q_shape, seed, dtype, 1.5), k = random_rounded(kv_shape, seed + 1, dtype, 1.5);
  Tensor v = random_rounded(kv_shape, seed + 2, dtype), dout = random_rounded(q_shape, seed + 3, dtype);
  Tensor dlse = testing::random_tensor(row_shape, seed + 4, DType::f32, 0.5);
  Tensor qp, kp;
  make_positions(c.positions, c.T, c.S, seed + 5, qp, kp);
  S2Pattern s2;
  if (c.s2) s2 = S2Pattern{16, 2, 4};
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));

  Tensor out_ref = Tensor::empty(q_shape), lse_ref = Tensor::empty(row_shape);
  cpu::attention_forward(out_ref, lse_ref, q, k, v, qp, kp, scale, c.causal, s2, cpu_stream());

  Tensor qg = q.to(dtype).to(gpu()), kg = k.to(dtype).to(gpu()), vg = v.to(dtype).to(gpu());
  Tensor qpg = qp.to(gpu()), kpg = kp.to(gpu());
  Tensor out = poisoned(q_shape, dtype), lse = poisoned(row_shape, DType::f32);
  cuda::attention_forward(out, lse, qg, kg, vg, qpg, kpg, scale, c.causal, s2, gpu_stream());
  EXPECT_TRUE(close(out, out_ref, dtype)) << "out";
  EXPECT_TRUE(testing::tensors_close(lse.to(Device::cpu()), lse_ref, 1e-5, 1e-5)) << "lse";

  // Backward on identical inputs: the reference gets the GPU's out and lse.
  Tensor out_f32 = out.to(Device::cpu()).to(DType::f32), lse_f32 = lse.to(Device::cpu());
  Tensor dq_ref = Tensor::empty(q_shape), dk_ref = Tensor::empty(kv_shape), dv_ref = Tensor::empty(kv_shape);
  cpu::attention_backward(dq_ref, dk_ref, dv_ref, dout, dlse, q, k, v, out_f32, lse_f32, qp, kp, scale, c.causal, s2,
                          cpu_stream());
  Tensor dq = poisoned(q_shape, dtype), dk = poisoned(kv_shape, dtype), dv = poisoned(kv_shape, dtype);
  Tensor doutg = dout.to(dtype).to(gpu()), dlseg = dlse.to(gpu());
  cuda::attention_backward(dq, dk, dv, doutg, dlseg, qg, kg, vg, out, lse, qpg, kpg, scale, c.causal, s2,
                           gpu_stream());
  EXPECT_TRUE(close(dq, dq_ref, dtype)) << "dq";
  EXPECT_TRUE(close(dk, dk_ref, dtype)) << "dk";
  EXPECT_TRUE(close(dv, dv_ref, dtype)) << "dv";
}

TEST(CudaAttention, MatchesTheCpuTwinOverShapesAndMasks) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 1000;
  for (DType dtype : {DType::bf16, DType::f32})
    for (int64_t T : {1, 17, 65, 130})
      for (int64_t D : {16, 64, 128})
        for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 1}})
          for (int mask = 0; mask < 3; ++mask) {
            check_case(Case{1, T, T, H, Hkv, D, mask > 0, mask == 2}, dtype, seed);
            seed += 10;
          }
}

TEST(CudaAttention, MatchesTheCpuTwinOnPositionsBatchesAndOddHeadDims) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 5000;
  const Case cases[] = {
      {2, 17, 130, 4, 2, 64, true, false, Positions::query_suffix},   // a query chunk after its keys (ring step)
      {1, 65, 130, 2, 1, 128, false, false, Positions::query_suffix},  // T != S, no mask
      {2, 130, 130, 4, 2, 64, true, true, Positions::shuffled},        // zigzag-like positions, S2
      {1, 130, 130, 2, 2, 32, false, true, Positions::shuffled},       // S2 without causal
      {2, 65, 65, 3, 3, 40, true, false, Positions::late_keys},        // empty rows; D not a power of two
      {1, 3, 200, 8, 2, 16, true, true, Positions::query_suffix},
      {3, 33, 33, 4, 4, 100, true, false, Positions::arange},
  };
  for (DType dtype : {DType::bf16, DType::f32})
    for (const Case& c : cases) {
      check_case(c, dtype, seed);
      seed += 10;
    }
}

TEST(CudaAttention, BackwardIsDeterministicAndTakesUndefinedGradients) {
  LOOM_SKIP_WITHOUT_GPU();
  const Shape q_shape{1, 130, 4, 64}, kv_shape{1, 130, 1, 64};
  Tensor q = testing::random_tensor(q_shape, 7, DType::f32).to(DType::bf16).to(gpu());
  Tensor k = testing::random_tensor(kv_shape, 8, DType::f32).to(DType::bf16).to(gpu());
  Tensor v = testing::random_tensor(kv_shape, 9, DType::f32).to(DType::bf16).to(gpu());
  Tensor dout = testing::random_tensor(q_shape, 10, DType::f32).to(DType::bf16).to(gpu());
  Tensor pos = Tensor::arange(130).to(gpu());
  Tensor out = poisoned(q_shape, DType::bf16), lse = poisoned({1, 4, 130}, DType::f32);
  cuda::attention_forward(out, lse, q, k, v, pos, pos, 0.125, true, S2Pattern{}, gpu_stream());
  Tensor dq[2], dk[2], dv[2];
  for (int run = 0; run < 2; ++run) {
    dq[run] = poisoned(q_shape, DType::bf16), dk[run] = poisoned(kv_shape, DType::bf16);
    dv[run] = poisoned(kv_shape, DType::bf16);
    cuda::attention_backward(dq[run], dk[run], dv[run], dout, Tensor(), q, k, v, out, lse, pos, pos, 0.125, true,
                             S2Pattern{}, gpu_stream());
  }
  EXPECT_TENSOR_CLOSE(dq[1].to(Device::cpu()).to(DType::f32), dq[0].to(Device::cpu()).to(DType::f32), 0, 0);
  EXPECT_TENSOR_CLOSE(dk[1].to(Device::cpu()).to(DType::f32), dk[0].to(Device::cpu()).to(DType::f32), 0, 0);
  EXPECT_TENSOR_CLOSE(dv[1].to(Device::cpu()).to(DType::f32), dv[0].to(Device::cpu()).to(DType::f32), 0, 0);
  // Both gradients undefined: every input gradient is zero.
  Tensor zq = poisoned(q_shape, DType::bf16), zk = poisoned(kv_shape, DType::bf16), zv = poisoned(kv_shape, DType::bf16);
  cuda::attention_backward(zq, zk, zv, Tensor(), Tensor(), q, k, v, out, lse, pos, pos, 0.125, true, S2Pattern{},
                           gpu_stream());
  EXPECT_TENSOR_CLOSE(zq.to(Device::cpu()).to(DType::f32), Tensor::zeros(q_shape), 0, 0);
  EXPECT_TENSOR_CLOSE(zk.to(Device::cpu()).to(DType::f32), Tensor::zeros(kv_shape), 0, 0);
  EXPECT_TENSOR_CLOSE(zv.to(Device::cpu()).to(DType::f32), Tensor::zeros(kv_shape), 0, 0);
}

TEST(CudaAttention, BadArgumentsAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor q = Tensor::zeros({1, 4, 2, 256}, DType::bf16, gpu()), out = Tensor::zeros({1, 4, 2, 256}, DType::bf16, gpu());
  Tensor lse = Tensor::zeros({1, 2, 4}, DType::f32, gpu());
  expect_error([&] { cuda::attention_forward(out, lse, q, q, q, Tensor(), Tensor(), 1.0, false, S2Pattern{}, gpu_stream()); },
               "D = 256");
  Tensor q3 = Tensor::zeros({1, 4, 3, 64}, DType::bf16, gpu()), k2 = Tensor::zeros({1, 4, 2, 64}, DType::bf16, gpu());
  Tensor out3 = Tensor::zeros({1, 4, 3, 64}, DType::bf16, gpu()), lse3 = Tensor::zeros({1, 3, 4}, DType::f32, gpu());
  expect_error([&] { cuda::attention_forward(out3, lse3, q3, k2, k2, Tensor(), Tensor(), 1.0, false, S2Pattern{}, gpu_stream()); },
               "Hkv = 2");
  Tensor lse_bf16 = Tensor::zeros({1, 3, 4}, DType::bf16, gpu());
  Tensor k3 = Tensor::zeros({1, 4, 3, 64}, DType::bf16, gpu());
  expect_error([&] { cuda::attention_forward(out3, lse_bf16, q3, k3, k3, Tensor(), Tensor(), 1.0, false, S2Pattern{}, gpu_stream()); },
               "lse dtype");
  Tensor host_pos = Tensor::arange(4);
  expect_error([&] { cuda::attention_forward(out3, lse3, q3, k3, k3, host_pos, host_pos, 1.0, true, S2Pattern{}, gpu_stream()); },
               "q_positions must be on");
}

}  // namespace
}  // namespace loom
