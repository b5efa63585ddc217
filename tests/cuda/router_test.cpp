// Routers of bf16 models on the GPU decide by f32 logits (models/layer.h:
// router_logits): a near-tie that bf16 would round to a tie (and top-k would
// break by index) goes to the larger logit, for the MoE FFN and for MoH; the
// auxiliary losses enter the loss in the model's dtype. (CPU arithmetic is
// f32/f64 only, so these run where bf16 compute exists.)
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "models/moe_ffn.h"
#include "models/softmax_attention.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using cuda_testing::gpu;

Tensor param(const Module& m, const std::string& name) {
  for (const auto& p : m.named_parameters())
    if (p.name == name) return p.var.data();
  ADD_FAILURE() << "no parameter " << name;
  return Tensor();
}

// Rows of x: (1, 1, 0, ...) in bf16 on the GPU. The router weight's rows give
// logit 0 = x0 and logit 1 = x0 + 2^-9 x1: 1 and 1 + 2^-9, a tie in bf16.
Tensor near_tie_input(int64_t tokens, int64_t c) {
  std::vector<double> xv(static_cast<size_t>(tokens * c), 0.0);
  for (int64_t t = 0; t < tokens; ++t) xv[t * c] = 1.0, xv[t * c + 1] = 1.0;
  return Tensor::from_vector(xv, {1, tokens, c}).to(DType::bf16).to(gpu());
}
std::vector<double> near_tie_router(int64_t c) {
  std::vector<double> w(static_cast<size_t>(2 * c), 0.0);
  w[0] = 1.0;
  w[c] = 1.0;
  w[c + 1] = 1.0 / 512;
  return w;
}

// linear_wide_out on bf16 x and an f32 weight holding bf16 values: the logits
// equal the f32 product of the widened x (the same exact products, summed in
// f32); dx = bf16(g) @ W rounded to bf16, dW = bf16(g)^T @ x in f32, against
// f64 references on the host. Also the fallback: f32 x takes linear's path.
TEST(CudaRouter, WideOutputLinearMatchesTheWidenedProduct) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t n = 300, in = 72, out = 18;
  Tensor x = testing::random_tensor({3, n / 3, in}, 51, DType::f32).to(DType::bf16);  // (3, 100, 72)
  Tensor w = testing::random_tensor({out, in}, 52, DType::f32, 0.2).to(DType::bf16).to(DType::f32);
  Tensor g = testing::random_tensor({3, n / 3, out}, 53, DType::f32);
  Variable xv(x.to(gpu()), true), wv(w.to(gpu()), true);
  Variable y = linear_wide_out(xv, wv);
  ASSERT_EQ(y.dtype(), DType::f32);
  ASSERT_EQ(y.shape(), (Shape{3, n / 3, out}));
  {
    NoGradGuard no_grad;
    Tensor ref = linear(cast(Variable(x.to(gpu())), DType::f32), Variable(w.to(gpu()))).data();
    EXPECT_TENSOR_CLOSE(y.data().to(Device::cpu()), ref.to(Device::cpu()), 1e-6, 1e-6) << "logits";
  }
  y.backward(g.to(gpu()));
  // f64 references from the rounded gradient.
  const std::vector<double> xs = x.to(DType::f64).to_vector<double>(), ws = w.to(DType::f64).to_vector<double>();
  const std::vector<double> gs = g.to(DType::bf16).to(DType::f64).to_vector<double>();
  std::vector<double> dx(static_cast<size_t>(n * in), 0.0), dw(static_cast<size_t>(out * in), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        dx[r * in + i] += gs[r * out + o] * ws[o * in + i];
        dw[o * in + i] += gs[r * out + o] * xs[r * in + i];
      }
  Tensor dx_ref = Tensor::from_vector(dx, {3, n / 3, in});
  EXPECT_EQ(xv.grad().dtype(), DType::f32) << "a bf16 leaf's gradient buffer";
  EXPECT_TENSOR_CLOSE(xv.grad().to(Device::cpu()).to(DType::f64), dx_ref, 4e-3, 1e-6)
      << "dx: the f32-accumulated product rounded to bf16 (one bf16 ulp)";
  EXPECT_TENSOR_CLOSE(wv.grad().to(Device::cpu()).to(DType::f64), Tensor::from_vector(dw, {out, in}), 1e-5, 1e-5)
      << "dW in f32";
  // f32 x: linear's path (widening is a no-op), same values as linear.
  Tensor x32 = x.to(DType::f32).to(gpu());
  NoGradGuard no_grad;
  EXPECT_TENSOR_CLOSE(linear_wide_out(Variable(x32), Variable(w.to(gpu()))).data().to(Device::cpu()),
                      linear(Variable(x32), Variable(w.to(gpu()))).data().to(Device::cpu()), 0.0, 0.0);
}

TEST(CudaRouter, MohRoutesABf16NearTieByF32Logits) {
  LOOM_SKIP_WITHOUT_GPU();
  DecoderConfig c;
  c.d_model = 8;
  c.n_heads = c.n_kv_heads = 3;
  c.head_dim = 2;
  c.dtype = DType::bf16;
  c.softmax.heads = "moh";
  c.softmax.moh.shared = 1;  // routed heads 1 and 2 (E = 2), top-1
  c.softmax.moh.topk = 1;
  SoftmaxAttention m(c, 0);
  m.initialize(41, 0.4, 1);
  param(m, "router_proj.weight").copy_(Tensor::from_vector(near_tie_router(8), {2, 8}));
  m.to(gpu());
  SequenceContext ctx;
  ctx.positions = Tensor::arange(3).to(gpu());
  NoGradGuard no_grad;
  Tensor y = m.forward(Variable(near_tie_input(3, 8)), ctx).data();
  EXPECT_EQ(y.dtype(), DType::bf16);
  EXPECT_EQ(ctx.stat("layer0.moh.head1.load"), 0.0);  // the lower index: what a bf16 tie would pick
  EXPECT_EQ(ctx.stat("layer0.moh.head2.load"), 1.0);
  ASSERT_EQ(ctx.aux_losses.size(), 1u);
  EXPECT_EQ(ctx.aux_losses[0].dtype(), DType::bf16);
}

TEST(CudaRouter, MoeRoutesABf16NearTieByF32Logits) {
  LOOM_SKIP_WITHOUT_GPU();
  DecoderConfig c;
  c.d_model = 8;
  c.ffn = "moe";
  c.dtype = DType::bf16;
  c.moe.experts = 2;
  c.moe.topk = 1;
  c.moe.hidden = 8;
  c.moe.router = "softmax_topk";
  c.moe.shared_experts = 0;
  MoeFFN moe(c, 0);
  moe.initialize(3, 0.5, 2);
  param(moe, "router_proj.weight").copy_(Tensor::from_vector(near_tie_router(8), {2, 8}));
  Tensor(param(moe, "experts.down_proj.weight").select(0, 0)).fill_(0.0);  // expert 0 outputs 0
  moe.to(gpu());
  SequenceContext ctx;
  NoGradGuard no_grad;
  Tensor y = moe.forward(Variable(near_tie_input(2, 8)), ctx).data().to(Device::cpu()).to(DType::f64);
  std::vector<double> v = y.to_vector<double>();
  for (int64_t t = 0; t < 2; ++t) {
    double norm = 0;
    for (int64_t i = 0; i < 8; ++i) norm += v[t * 8 + i] * v[t * 8 + i];
    EXPECT_GT(norm, 0.0) << "token " << t << " went to expert 0 (a bf16 tie)";
  }
  ASSERT_FALSE(ctx.aux_losses.empty());
  for (const Variable& aux : ctx.aux_losses) EXPECT_EQ(aux.dtype(), DType::bf16);
}

}  // namespace
}  // namespace loom
