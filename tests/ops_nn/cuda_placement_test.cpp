// Every ops_nn op runs on CUDA tensors through the device dispatch, its
// outputs staying on the GPU (host index tensors are moved there); parity with
// the CPU, values and gradients, is in tests/cuda/ops_dispatch_test.cpp.
// Skipped where no GPU is usable.
#include <gtest/gtest.h>

#include "framework/ops_nn.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

TEST(OpsNnCuda, RunOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  Device gpu = Device::cuda(0);
  Variable x(Tensor::zeros({2, 3, 2, 4}, DType::f32, gpu)), w(Tensor::ones({4}, DType::f32, gpu));
  Variable kv(Tensor::zeros({2, 3, 1, 4}, DType::f32, gpu));
  EXPECT_EQ(rms_norm(x, w, 1e-5).device(), gpu);
  EXPECT_EQ(silu(x).device(), gpu);
  EXPECT_EQ(sigmoid(x).device(), gpu);
  EXPECT_EQ(swiglu(x, x).device(), gpu);
  EXPECT_EQ(softmax(x, 1).device(), gpu);
  EXPECT_EQ(rope(x, Tensor::arange(3), 10000.0).device(), gpu);
  AttentionResult r = attention(x, kv, kv, AttentionOptions{});
  EXPECT_EQ(r.out.device(), gpu);
  EXPECT_EQ(r.lse.device(), gpu);
  Variable logits(Tensor::zeros({3, 5}, DType::f32, gpu));
  Variable loss = cross_entropy(logits, Tensor::zeros({3}, DType::i64));
  EXPECT_EQ(loss.device(), gpu);
  EXPECT_NEAR(loss.item(), std::log(5.0), 1e-6);  // uniform logits
}

}  // namespace
}  // namespace loom
