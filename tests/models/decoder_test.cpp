// Decoder LM: parameter names, whole-model gradients against finite
// differences, causality, activation checkpointing, generation, export names.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "models/decoder.h"
#include "models/export.h"
#include "tests/testing.h"

namespace loom {
namespace {

DecoderConfig tiny_config() {
  DecoderConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.ffn_hidden = 12;
  c.init_std = 0.3;
  c.dtype = DType::f64;
  return c;
}

TEST(Decoder, ParameterNamesAreStable) {
  DecoderConfig c = tiny_config();
  c.n_layers = 1;
  c.tie_embeddings = false;
  DecoderLM model(c);
  std::vector<std::string> names;
  for (const auto& p : model.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{
                       "embed.weight", "blocks.0.mixer_norm.weight", "blocks.0.mixer.q_proj.weight",
                       "blocks.0.mixer.k_proj.weight", "blocks.0.mixer.v_proj.weight", "blocks.0.mixer.o_proj.weight",
                       "blocks.0.ffn_norm.weight", "blocks.0.ffn.gate_proj.weight", "blocks.0.ffn.up_proj.weight",
                       "blocks.0.ffn.down_proj.weight", "norm.weight", "lm_head.weight"}));
  EXPECT_EQ(model.named_parameters()[3].var.shape(), (Shape{4, 8}));  // k_proj: Hkv * D = 4
  c.tie_embeddings = true;
  EXPECT_EQ(DecoderLM(c).named_parameters().back().name, "norm.weight");
}

TEST(Decoder, BadConfigsNameTheValues) {
  DecoderConfig c = tiny_config();
  c.n_heads = 3;
  c.n_kv_heads = 2;
  try {
    DecoderLM m(c);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n_heads 3"), std::string::npos) << e.what();
  }
  c = tiny_config();
  c.layers = "SX";
  try {
    DecoderLM m(c);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'X'"), std::string::npos) << e.what();
  }
}

// Loss of the model on fixed data (f64).
double model_loss(const DecoderLM& model, const Tensor& ids, const Tensor& targets) {
  NoGradGuard no_grad;
  SequenceContext ctx;
  return model.loss(ids, targets, ctx).item();
}

TEST(Decoder, WholeModelGradientsMatchFiniteDifferences) {
  DecoderLM model(tiny_config());
  model.initialize(3, 0.3, 2);
  Tensor ids = testing::random_indices({2, 5}, 11, 21);
  Tensor targets = testing::random_indices({2, 5}, 11, 22);
  targets.data<int64_t>()[3] = -100;  // an ignored target
  SequenceContext ctx;
  model.loss(ids, targets, ctx).backward();
  // Check a spread of entries of every parameter.
  for (auto& p : model.named_parameters()) {
    Tensor w = p.var.data();
    Tensor g = p.var.grad();
    ASSERT_TRUE(g.defined()) << p.name;
    double* data = w.data<double>();
    const double* grad = g.data<double>();
    for (int64_t j = 0; j < w.numel(); j += std::max<int64_t>(1, w.numel() / 7)) {
      double saved = data[j], eps = 1e-6;
      data[j] = saved + eps;
      double plus = model_loss(model, ids, targets);
      data[j] = saved - eps;
      double minus = model_loss(model, ids, targets);
      data[j] = saved;
      double numeric = (plus - minus) / (2 * eps);
      EXPECT_NEAR(grad[j], numeric, 1e-6 + 1e-5 * std::fabs(numeric)) << p.name << "[" << j << "]";
    }
  }
}

TEST(Decoder, LogitsAreCausal) {
  DecoderLM model(tiny_config());
  model.initialize(4, 0.3, 2);
  Tensor ids = testing::random_indices({1, 9}, 11, 5);
  SequenceContext c1, c2;
  Tensor a = model.forward(ids, c1).data();
  Tensor changed = ids.clone();
  changed.data<int64_t>()[6] = (changed.data<int64_t>()[6] + 1) % 11;
  Tensor b = model.forward(changed, c2).data();
  EXPECT_TENSOR_CLOSE(b.narrow(1, 0, 6), a.narrow(1, 0, 6), 0, 0);  // earlier positions untouched
  EXPECT_FALSE(testing::tensors_close(b.narrow(1, 6, 3), a.narrow(1, 6, 3), 0, 1e-9));
}

TEST(Decoder, ActivationCheckpointingGivesIdenticalGradients) {
  DecoderConfig c = tiny_config();
  Tensor ids = testing::random_indices({2, 6}, 11, 8), targets = testing::random_indices({2, 6}, 11, 9);
  DecoderLM plain(c);
  plain.initialize(5, 0.3, 2);
  c.activation_checkpointing = true;
  DecoderLM ckpt(c);
  ckpt.initialize(5, 0.3, 2);
  SequenceContext x1, x2;
  Variable l1 = plain.loss(ids, targets, x1), l2 = ckpt.loss(ids, targets, x2);
  EXPECT_EQ(l1.item(), l2.item());
  l1.backward();
  l2.backward();
  auto p1 = plain.named_parameters(), p2 = ckpt.named_parameters();
  for (size_t i = 0; i < p1.size(); ++i) EXPECT_TENSOR_CLOSE(p2[i].var.grad(), p1[i].var.grad(), 0, 0) << p1[i].name;
}

TEST(Decoder, GenerationIsDeterministic) {
  DecoderConfig c = tiny_config();
  c.dtype = DType::f32;
  DecoderLM model(c);
  model.initialize(6, 0.3, 2);
  std::vector<int64_t> prompt = {1, 2, 3};
  auto greedy = generate(model, prompt, 5, 0.0, 0, 16);
  EXPECT_EQ(greedy.size(), 5u);
  EXPECT_EQ(generate(model, prompt, 5, 0.0, 0, 16), greedy);
  auto s1 = generate(model, prompt, 8, 1.0, 42, 4);  // context window shorter than the text
  EXPECT_EQ(generate(model, prompt, 8, 1.0, 42, 4), s1);
  for (int64_t t : s1) EXPECT_TRUE(t >= 0 && t < 11);
}

TEST(Decoder, ExportNamesFollowLlama) {
  EXPECT_EQ(export_name("embed.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(export_name("blocks.12.mixer.k_proj.weight"), "model.layers.12.self_attn.k_proj.weight");
  EXPECT_EQ(export_name("blocks.0.ffn_norm.weight"), "model.layers.0.post_attention_layernorm.weight");
  EXPECT_EQ(export_name("blocks.0.ffn.down_proj.weight"), "model.layers.0.mlp.down_proj.weight");
  EXPECT_THROW(export_name("something.else"), Error);
  nlohmann::json j = export_config(tiny_config(), DType::bf16);
  EXPECT_EQ(j["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(j["num_key_value_heads"], 1);
  EXPECT_EQ(j["torch_dtype"], "bfloat16");
}

}  // namespace
}  // namespace loom
