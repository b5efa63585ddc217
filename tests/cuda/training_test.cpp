// Training on CUDA tracks training on CPU: a small decoder LM (softmax,
// lightning + softmax, and an MoE FFN with MoH heads) takes the same AdamW
// steps with clipping on the same batches from the same initial weights, on
// CPU in f32 and on the GPU in f32 and in bf16 mixed precision (bf16 compute
// weights and activations, fp32 masters, moments, gradients and loss). The
// f32 curves agree to fp32 rounding; the bf16 curve stays within bf16 noise
// of the CPU one and falls as far.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "models/decoder.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "tests/testing.h"

namespace loom {
namespace {

DecoderConfig small_config(const std::string& layers, const std::string& ffn, bool moh) {
  DecoderConfig c;
  c.vocab_size = 64;
  c.d_model = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_hidden = 96;
  c.layers = layers;
  c.max_seq_len = 64;
  c.ffn = ffn;
  c.moe.experts = 4;
  c.moe.topk = 2;
  if (moh) {
    c.softmax.heads = "moh";
    c.softmax.moh.shared = 1;
    c.softmax.moh.topk = 2;
  }
  return c;
}

// A learnable stream: each row is an arithmetic sequence modulo 61 whose step
// depends on the row; targets are the next tokens.
void batch(int step, Tensor& ids, Tensor& targets) {
  const int64_t B = 2, T = 33;
  std::vector<int64_t> in(B * T), out(B * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      int64_t stride = 3 + 2 * b, start = (step * 5 + b) % 61;
      in[b * T + t] = (start + stride * t) % 61;
      out[b * T + t] = (start + stride * (t + 1)) % 61;
    }
  ids = Tensor::from_vector(in, {B, T});
  targets = Tensor::from_vector(out, {B, T});
}

std::vector<double> train(const DecoderConfig& config, Device device, DType dtype, int steps) {
  DecoderLM model(config);
  model.initialize(11, config.init_std, config.n_layers);  // on the host: identical start everywhere
  if (device.is_cuda()) {
    model.to(device);
    if (dtype != DType::f32) model.to(dtype);
  }
  std::vector<Parameter> params = model.named_parameters();
  AdamW optimizer(params, AdamWConfig{});
  std::vector<double> losses;
  for (int step = 0; step < steps; ++step) {
    Tensor ids, targets;
    batch(step, ids, targets);
    if (device.is_cuda()) {
      ids = ids.to(device);
      targets = targets.to(device);
    }
    SequenceContext ctx;
    Variable loss = model.loss(ids, targets, ctx);
    EXPECT_EQ(loss.dtype(), DType::f32) << "the loss is fp32 on every device";
    loss.backward();
    EXPECT_TRUE(grads_finite(params));
    clip_grad_norm(params, 1.0);
    optimizer.step(3e-3);
    optimizer.zero_grad();
    losses.push_back(loss.item());
  }
  return losses;
}

struct Case {
  const char* name;
  const char* layers;
  const char* ffn;
  bool moh;
  // Per-step loss tolerances against the CPU run. Routed models (MoE, MoH)
  // make discrete top-k choices that a rounding difference can flip, so they
  // get more room than the dense ones.
  double f32_tol, bf16_tol;
};

class CudaTraining : public ::testing::TestWithParam<Case> {};

TEST_P(CudaTraining, LossCurveTracksTheCpuRun) {
  LOOM_SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  DecoderConfig config = small_config(c.layers, c.ffn, c.moh);
  const int steps = 25;
  std::vector<double> cpu = train(config, Device::cpu(), DType::f32, steps);
  std::vector<double> gpu32 = train(config, Device::cuda(0), DType::f32, steps);
  std::vector<double> gpu16 = train(config, Device::cuda(0), DType::bf16, steps);
  for (int s = 0; s < steps; ++s) {
    SCOPED_TRACE(::testing::Message() << "step " << s << ": cpu " << cpu[s] << ", cuda f32 " << gpu32[s]
                                      << ", cuda bf16 " << gpu16[s]);
    EXPECT_NEAR(gpu32[s], cpu[s], c.f32_tol);
    EXPECT_NEAR(gpu16[s], cpu[s], c.bf16_tol);
  }
  EXPECT_LT(cpu.back(), cpu.front() - 0.5) << "the CPU run must learn for the comparison to mean anything";
  EXPECT_LT(gpu16.back(), gpu16.front() - 0.5);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaTraining,
                         ::testing::Values(Case{"softmax", "S", "dense", false, 5e-3, 0.1},
                                           Case{"lightning_softmax", "LS", "dense", false, 5e-3, 0.1},
                                           Case{"moe_moh", "S", "moe", true, 2e-2, 0.15}),
                         [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace loom
