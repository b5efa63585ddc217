// The `L` mixer: parameter names, TransNormer decay schedule, causality,
// whole-mixer gradients (input and every parameter) against finite
// differences with and without gate/norm/activation, FLOP count, and a hybrid
// "LS" decoder whose loss falls under plain SGD.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "models/decoder.h"
#include "models/lightning_attention.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::random_tensor;

DecoderConfig tiny_config() {
  DecoderConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.ffn_hidden = 12;
  c.init_std = 0.3;
  c.dtype = DType::f64;
  c.layers = "L";
  c.lightning.block = 3;
  c.lightning.decay_scale = 4.0;
  return c;
}

TEST(LightningMixer, ParameterNamesAreStable) {
  DecoderConfig c = tiny_config();
  c.n_layers = 1;
  DecoderLM model(c);
  std::vector<std::string> names;
  for (const auto& p : model.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"embed.weight", "blocks.0.mixer_norm.weight",
                                             "blocks.0.mixer.q_proj.weight", "blocks.0.mixer.k_proj.weight",
                                             "blocks.0.mixer.v_proj.weight", "blocks.0.mixer.gate_proj.weight",
                                             "blocks.0.mixer.out_norm.weight", "blocks.0.mixer.o_proj.weight",
                                             "blocks.0.ffn_norm.weight", "blocks.0.ffn.gate_proj.weight",
                                             "blocks.0.ffn.up_proj.weight", "blocks.0.ffn.down_proj.weight",
                                             "norm.weight"}));
  EXPECT_EQ(model.named_parameters()[6].var.shape(), (Shape{8}));     // out_norm: H*D
  EXPECT_EQ(model.named_parameters()[7].var.shape(), (Shape{8, 8}));  // o_proj: (C, H*D)
  c.lightning.output_gate = false;
  c.lightning.output_norm = false;
  std::vector<std::string> plain;
  for (const auto& p : LightningAttention(c, 0).named_parameters()) plain.push_back(p.name);
  EXPECT_EQ(plain, (std::vector<std::string>{"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}));
  c.lightning.short_conv = 4;
  std::vector<std::string> conv;
  LightningAttention with_conv(c, 0);
  for (const auto& p : with_conv.named_parameters()) conv.push_back(p.name);
  EXPECT_EQ(conv, (std::vector<std::string>{"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                            "q_conv.weight", "k_conv.weight", "v_conv.weight"}));
  EXPECT_EQ(with_conv.named_parameters()[4].var.shape(), (Shape{3, 8}));  // (width - 1, H*D)
}

TEST(LightningMixer, TransNormerDecaySchedule) {
  EXPECT_EQ(transnormer_decay_lambdas(8.0, 4, 0, 2).to_vector<double>(), (std::vector<double>{0, 2, 4, 6}));
  EXPECT_EQ(transnormer_decay_lambdas(8.0, 4, 1, 2).to_vector<double>(), (std::vector<double>{0, 1, 2, 3}));
  EXPECT_EQ(transnormer_decay_lambdas(0.0, 3, 1, 4).to_vector<double>(), (std::vector<double>{0, 0, 0}));
  DecoderConfig c = tiny_config();
  c.n_heads = 4;
  c.d_model = 16;
  c.lightning.decay_scale = 8.0;
  EXPECT_EQ(LightningAttention(c, 1).decay_lambdas().to_vector<double>(), (std::vector<double>{0, 1, 2, 3}));
  EXPECT_DOUBLE_EQ(LightningAttention(c, 1).out_scale(), 0.5);  // 1/sqrt(D), D = 4
  EXPECT_ERROR_MENTIONS(transnormer_decay_lambdas(-1.0, 4, 0, 2), {"decay_scale = -1"});
}

TEST(LightningMixer, OutputsAreCausal) {
  DecoderConfig c = tiny_config();
  LightningAttention mixer(c, 0);
  mixer.initialize(3, 0.3, 2);
  Tensor x = random_tensor({1, 9, 8}, 4);
  SequenceContext ctx;
  Tensor a = mixer.forward(Variable(x), ctx).data();
  Tensor changed = x.clone();
  changed.data<double>()[6 * 8 + 2] += 1.0;
  Tensor b = mixer.forward(Variable(changed), ctx).data();
  EXPECT_TENSOR_CLOSE(b.narrow(1, 0, 6), a.narrow(1, 0, 6), 0, 0);
  EXPECT_FALSE(testing::tensors_close(b.narrow(1, 6, 3), a.narrow(1, 6, 3), 0, 1e-9));
}

// <mixer(x), R> differentiated w.r.t. x and every parameter, against central differences.
void check_mixer_gradients(const DecoderConfig& c, int64_t B, int64_t T, uint64_t seed) {
  LightningAttention mixer(c, 1);
  mixer.initialize(seed, 0.3, c.n_layers);
  for (const auto& p : mixer.named_parameters()) {  // short-convolution taps start at 0: make them count
    Tensor taps = p.var.data();  // shares the parameter's storage
    if (p.name.find("_conv.") != std::string::npos) taps.copy_(random_tensor(taps.shape(), seed + 7, DType::f64, 0.5));
  }
  Tensor x = random_tensor({B, T, c.d_model}, seed + 1);
  Tensor r = random_tensor({B, T, c.d_model}, seed + 2);
  auto objective = [&](const Variable& in) {
    SequenceContext ctx;
    return sum(mul(mixer.forward(in, ctx), Variable(r)));
  };
  Variable xv(x, true);
  objective(xv).backward();
  std::vector<std::pair<std::string, Variable>> checked = {{"x", xv}};
  for (const auto& p : mixer.named_parameters()) checked.emplace_back(p.name, p.var);
  for (auto& [name, var] : checked) {
    Tensor data = var.data(), grad = var.grad();
    ASSERT_TRUE(grad.defined()) << name;
    double* w = data.data<double>();
    const double* g = grad.data<double>();
    for (int64_t j = 0; j < data.numel(); ++j) {
      double saved = w[j], eps = 1e-6;
      NoGradGuard no_grad;
      w[j] = saved + eps;
      double plus = objective(Variable(x)).item();
      w[j] = saved - eps;
      double minus = objective(Variable(x)).item();
      w[j] = saved;
      double numeric = (plus - minus) / (2 * eps);
      ASSERT_NEAR(g[j], numeric, 1e-7 + 1e-5 * std::fabs(numeric)) << name << "[" << j << "]";
    }
  }
}

TEST(LightningMixer, GradientsMatchFiniteDifferences) {
  DecoderConfig c = tiny_config();
  check_mixer_gradients(c, 2, 7, 10);  // gate, per-head norm, silu; T = 7 with block 3 (tail of 1)
  c.lightning.output_gate = false;
  c.lightning.output_norm = false;
  c.lightning.qk_activation = "none";
  c.lightning.block = 4;
  check_mixer_gradients(c, 1, 9, 20);
  c.lightning.output_norm = true;
  c.lightning.decay_scale = 0.0;
  check_mixer_gradients(c, 2, 5, 30);
  c = tiny_config();
  c.lightning.short_conv = 3;
  check_mixer_gradients(c, 2, 7, 40);  // every tap reaches inside the sequence
  check_mixer_gradients(c, 1, 2, 50);  // T = 2 < width: the second tap falls before the start
}

// y_t = x_t + sum_i w[i-1] x_{t-i} per channel, zeros before the start; taps start at 0 (identity).
TEST(LightningMixer, ShortConvolutionShiftsEachChannelCausally) {
  ShortConv conv(3, 3, DType::f64);
  Tensor x = random_tensor({2, 5, 3}, 60);
  EXPECT_TENSOR_CLOSE(conv.forward(Variable(x)).data(), x, 0, 0);  // a new layer: no convolution yet
  Tensor w = random_tensor({2, 3}, 61);
  Tensor taps = conv.named_parameters()[0].var.data();  // shares the parameter's storage
  taps.copy_(w);
  Tensor y = conv.forward(Variable(x)).data();
  const double* xd = x.data<double>();
  const double* wd = w.data<double>();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 5; ++t)
      for (int64_t ch = 0; ch < 3; ++ch) {
        double expected = xd[(b * 5 + t) * 3 + ch];
        for (int64_t i = 1; i <= 2 && i <= t; ++i) expected += wd[(i - 1) * 3 + ch] * xd[(b * 5 + t - i) * 3 + ch];
        EXPECT_NEAR(y.data<double>()[(b * 5 + t) * 3 + ch], expected, 1e-14) << b << " " << t << " " << ch;
      }
  EXPECT_ERROR_MENTIONS(ShortConv(3, 1, DType::f64), {"width 1"});
  EXPECT_ERROR_MENTIONS(conv.forward(Variable(random_tensor({2, 5, 4}, 62))), {"(B, T, 3)"});
}

TEST(LightningMixer, ForwardFlopsFollowAlgorithms11) {
  DecoderConfig c = tiny_config();
  c.lightning.block = 64;
  LightningAttention mixer(c, 0);
  // 2 * (2 * Bk * D + 2 * D * D) * H with Bk = 64, D = 4, H = 2; independent of the context.
  EXPECT_DOUBLE_EQ(mixer.extra_forward_flops_per_token(4096), 2.0 * (2 * 64 * 4 + 2 * 4 * 4) * 2);
  EXPECT_DOUBLE_EQ(mixer.extra_forward_flops_per_token(16), mixer.extra_forward_flops_per_token(4096));
}

TEST(LightningMixer, BadOptionsNameTheValues) {
  DecoderConfig c = tiny_config();
  c.lightning.qk_activation = "relu";
  EXPECT_ERROR_MENTIONS(DecoderLM(c), {"model.L.qk_activation", "relu"});
  c = tiny_config();
  c.lightning.block = 0;
  EXPECT_ERROR_MENTIONS(DecoderLM(c), {"model.L.block = 0"});
  c = tiny_config();
  c.lightning.decay_scale = -2.0;
  EXPECT_ERROR_MENTIONS(DecoderLM(c), {"model.L.decay_scale = -2"});
  c = tiny_config();
  c.lightning.short_conv = 1;
  EXPECT_ERROR_MENTIONS(DecoderLM(c), {"model.L.short_conv = 1"});
}

// A hybrid lightning + softmax decoder learns a fixed batch with plain SGD.
TEST(LightningMixer, HybridDecoderTrains) {
  DecoderConfig c = tiny_config();
  c.layers = "LS";
  c.d_model = 16;
  c.n_heads = 2;
  c.head_dim = 8;
  c.ffn_hidden = 32;
  c.lightning.block = 4;
  DecoderLM model(c);
  model.initialize(7, 0.1, c.n_layers);
  EXPECT_EQ(model.blocks()[0]->mixer().extra_forward_flops_per_token(10), 2.0 * (2 * 4 * 8 + 2 * 8 * 8) * 2);
  Tensor ids = testing::random_indices({2, 10}, c.vocab_size, 51);
  Tensor targets = testing::random_indices({2, 10}, c.vocab_size, 52);
  std::vector<double> losses;
  const double lr = 0.3;
  for (int step = 0; step < 20; ++step) {
    model.zero_grad();
    SequenceContext ctx;
    Variable loss = model.loss(ids, targets, ctx);
    losses.push_back(loss.item());
    loss.backward();
    for (auto& p : model.named_parameters()) {
      ASSERT_TRUE(p.var.grad().defined()) << p.name;
      double* w = p.var.data().data<double>();
      const double* g = p.var.grad().data<double>();
      for (int64_t j = 0; j < p.var.numel(); ++j) w[j] -= lr * g[j];
    }
  }
  EXPECT_LT(losses.back(), 0.5 * losses.front()) << "first " << losses.front() << ", last " << losses.back();
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_TRUE(std::isfinite(losses[i])) << "step " << i;
}

}  // namespace
}  // namespace loom
