// lightning_attention op: finite-difference gradients of both outputs w.r.t.
// q, k, v and the initial state (f64, odd sizes, non-contiguous inputs, T not
// a multiple of the block; recurrent and blocked); chaining two calls through
// the state equals one call (forward and gradients); f32 runs; errors.
#include <gtest/gtest.h>

#include "framework/ops.h"
#include "framework/ops_lightning.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::GradCheckOptions;
using testing::non_contiguous;
using testing::random_tensor;

Tensor lambdas_of(const std::vector<double>& values) {
  return Tensor::from_vector(values, {static_cast<int64_t>(values.size())});
}

TEST(LightningOp, GradientsOfBothOutputsIncludingInitialState) {
  const int64_t B = 2, T = 7, H = 3, D = 3;
  Tensor lambdas = lambdas_of({0.0, 0.4, 2.0});
  for (int64_t block : {0, 3, 16}) {
    std::vector<Tensor> inputs = {non_contiguous(random_tensor({B, T, H, D}, 1, DType::f64, 0.5)),
                                  non_contiguous(random_tensor({B, T, H, D}, 2, DType::f64, 0.5)),
                                  non_contiguous(random_tensor({B, T, H, D}, 3)),
                                  non_contiguous(random_tensor({B, H, D, D}, 4))};
    EXPECT_GRADCHECK(
        [&](const std::vector<Variable>& in) {
          LightningResult r = lightning_attention(in[0], in[1], in[2], lambdas, in[3], 0.6, block);
          return std::vector<Variable>{r.out, r.final_state};
        },
        inputs)
        << "block " << block;
  }
}

TEST(LightningOp, GradientsWithoutInitialStateAndFromOneOutput) {
  const int64_t B = 1, T = 5, H = 2, D = 5;
  Tensor lambdas = lambdas_of({0.0, 1.3});
  std::vector<Tensor> inputs = {random_tensor({B, T, H, D}, 11, DType::f64, 0.5),
                                random_tensor({B, T, H, D}, 12, DType::f64, 0.5), random_tensor({B, T, H, D}, 13)};
  for (int64_t block : {0, 2}) {
    EXPECT_GRADCHECK(
        [&](const std::vector<Variable>& in) {
          return std::vector<Variable>{lightning_attention(in[0], in[1], in[2], lambdas, {}, 1.0, block).out};
        },
        inputs);
    EXPECT_GRADCHECK(
        [&](const std::vector<Variable>& in) {
          return std::vector<Variable>{lightning_attention(in[0], in[1], in[2], lambdas, {}, 1.0, block).final_state};
        },
        inputs);
  }
}

// One call over T tokens equals two calls chained through the state: out is
// the concatenation, the final state is the second call's, and the gradients
// of q, k, v and S0 agree (LASP-2 relies on exactly this).
TEST(LightningOp, ChainingThroughTheStateEqualsOneCall) {
  const int64_t B = 2, T = 11, H = 2, D = 3, split = 5, block = 4;
  Tensor lambdas = lambdas_of({0.0, 0.8});
  Tensor q = random_tensor({B, T, H, D}, 21, DType::f64, 0.5), k = random_tensor({B, T, H, D}, 22, DType::f64, 0.5);
  Tensor v = random_tensor({B, T, H, D}, 23), s0 = random_tensor({B, H, D, D}, 24);
  Tensor dout = random_tensor({B, T, H, D}, 25), dsf = random_tensor({B, H, D, D}, 26);

  Variable q1(q, true), k1(k, true), v1(v, true), s1(s0, true);
  LightningResult whole = lightning_attention(q1, k1, v1, lambdas, s1, 0.5, block);
  run_backward({whole.out, whole.final_state}, {dout, dsf});

  Variable q2(q, true), k2(k, true), v2(v, true), s2(s0, true);
  LightningResult first = lightning_attention(narrow(q2, 1, 0, split), narrow(k2, 1, 0, split),
                                              narrow(v2, 1, 0, split), lambdas, s2, 0.5, block);
  LightningResult second = lightning_attention(narrow(q2, 1, split, T - split), narrow(k2, 1, split, T - split),
                                               narrow(v2, 1, split, T - split), lambdas, first.final_state, 0.5, 0);
  Variable out = concat({first.out, second.out}, 1);
  EXPECT_TENSOR_CLOSE(out.data(), whole.out.data(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(second.final_state.data(), whole.final_state.data(), 1e-12, 1e-12);
  run_backward({out, second.final_state}, {dout, dsf});
  EXPECT_TENSOR_CLOSE(q2.grad(), q1.grad(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(k2.grad(), k1.grad(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(v2.grad(), v1.grad(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(s2.grad(), s1.grad(), 1e-12, 1e-12);
}

TEST(LightningOp, F32RunsAndMatchesF64) {
  const int64_t B = 1, T = 33, H = 2, D = 4;
  Tensor lambdas = lambdas_of({0.0, 0.3});
  Tensor q = random_tensor({B, T, H, D}, 31, DType::f64, 0.5), k = random_tensor({B, T, H, D}, 32, DType::f64, 0.5);
  Tensor v = random_tensor({B, T, H, D}, 33);
  LightningResult r64 = lightning_attention(Variable(q), Variable(k), Variable(v), lambdas, {}, 1.0, 8);
  Variable q32(q.to(DType::f32), true);
  LightningResult r32 = lightning_attention(q32, Variable(k.to(DType::f32)), Variable(v.to(DType::f32)), lambdas, {},
                                            1.0, 8);
  EXPECT_EQ(r32.out.dtype(), DType::f32);
  EXPECT_EQ(r32.final_state.dtype(), DType::f32);
  EXPECT_TENSOR_CLOSE(r32.out.data().to(DType::f64), r64.out.data(), 1e-4, 1e-4);
  sum(r32.out).backward();
  EXPECT_EQ(q32.grad().dtype(), DType::f32);
}

TEST(LightningOp, ErrorsNameTheValues) {
  Variable q(Tensor::zeros({2, 5, 3, 4}, DType::f64)), k(Tensor::zeros({2, 5, 3, 4}, DType::f64));
  Variable v(Tensor::zeros({2, 5, 3, 4}, DType::f64));
  Tensor lambdas = lambdas_of({0.0, 0.1, 0.2});
  const char* op = "lightning_attention";
  EXPECT_ERROR_MENTIONS(lightning_attention(q, Variable(Tensor::zeros({2, 6, 3, 4}, DType::f64)), v, lambdas, {}, 1, 4),
                        {op, "k (2, 6, 3, 4)", "(B, T, H, D)"});
  EXPECT_ERROR_MENTIONS(lightning_attention(q, k, Variable(Tensor::zeros({2, 5, 3, 4}, DType::f32)), lambdas, {}, 1, 4),
                        {op, "v f32"});
  EXPECT_ERROR_MENTIONS(lightning_attention(Variable(Tensor::zeros({5, 3, 4}, DType::f64)), k, v, lambdas, {}, 1, 4),
                        {op, "q shape (5, 3, 4)"});
  EXPECT_ERROR_MENTIONS(lightning_attention(q, k, v, lambdas_of({0.0, 0.1}), {}, 1, 4),
                        {op, "decay_lambdas shape (2,)", "(3,)"});
  EXPECT_ERROR_MENTIONS(lightning_attention(q, k, v, lambdas_of({0.0, 0.1, -3.0}), {}, 1, 4),
                        {"decay_lambdas[2] = -3"});
  EXPECT_ERROR_MENTIONS(lightning_attention(q, k, v, lambdas, {}, 1, -2), {op, "block_size = -2"});
  EXPECT_ERROR_MENTIONS(
      lightning_attention(q, k, v, lambdas, Variable(Tensor::zeros({2, 3, 4, 5}, DType::f64)), 1, 4),
      {op, "initial_state shape (2, 3, 4, 5)", "(2, 3, 4, 4)"});
  EXPECT_ERROR_MENTIONS(
      lightning_attention(q, k, v, lambdas, Variable(Tensor::zeros({2, 3, 4, 4}, DType::f32)), 1, 4),
      {op, "initial_state is f32", "q is f64"});
  EXPECT_ERROR_MENTIONS(lightning_attention(Variable(Tensor::zeros({2, 5, 3, 4}, DType::i64)), k, v, lambdas, {}, 1, 4),
                        {op, "input q", "f32 or f64 needed"});
}

TEST(LightningOp, CudaTensorsRunOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  // The decays stay on the host; outputs on the GPU (parity: tests/cuda/lightning_test.cpp).
  Variable x(Tensor::zeros({1, 3, 2, 4}, DType::f32, Device::cuda(0)));
  LightningResult r = lightning_attention(x, x, x, lambdas_of({0.0, 0.5}), {}, 1, 4);
  EXPECT_EQ(r.out.device(), Device::cuda(0));
  EXPECT_EQ(r.final_state.device(), Device::cuda(0));
}

}  // namespace
}  // namespace loom
