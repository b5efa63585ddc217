// Every ops_nn op refuses CUDA tensors with a clear message until its CUDA
// kernel exists (skipped where no GPU is usable).
#include <gtest/gtest.h>

#include "framework/ops_nn.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

TEST(OpsNnCuda, RefusedWithClearMessage) {
  LOOM_SKIP_WITHOUT_GPU();
  Device gpu = Device::cuda(0);
  Variable x(Tensor::zeros({2, 3, 2, 4}, DType::f32, gpu)), w(Tensor::ones({4}, DType::f32, gpu));
  Variable kv(Tensor::zeros({2, 3, 1, 4}, DType::f32, gpu));
  std::vector<std::string> expected = {"no CUDA kernel yet", "cuda:0"};
  EXPECT_ERROR_MENTIONS(rms_norm(x, w, 1e-5), expected);
  EXPECT_ERROR_MENTIONS(silu(x), expected);
  EXPECT_ERROR_MENTIONS(sigmoid(x), expected);
  EXPECT_ERROR_MENTIONS(swiglu(x, x), expected);
  EXPECT_ERROR_MENTIONS(softmax(x, 1), expected);
  EXPECT_ERROR_MENTIONS(rope(x, Tensor::arange(3), 10000.0), expected);
  EXPECT_ERROR_MENTIONS(attention(x, kv, kv, AttentionOptions{}), expected);
  Variable logits(Tensor::zeros({3, 5}, DType::f32, gpu));
  EXPECT_ERROR_MENTIONS(cross_entropy(logits, Tensor::zeros({3}, DType::i64)), expected);
}

}  // namespace
}  // namespace loom
