// Mixture-of-heads attention (ALGORITHMS.md §8): parameters, the gate at zero
// router weights with all routed heads chosen (= 1, so the plain layer), the
// load-balance loss against a hand computation, its weighting by aux_coef over
// the MoH layers, whole-mixer gradients (selection held fixed by well-separated
// router probabilities), the decoder integration and option errors.
#include "tests/svariants/svariant_testing.h"

namespace loom {
namespace {

using testing::svariant_config;

DecoderConfig moh_config(int64_t heads, int64_t kv_heads, int64_t shared, int64_t topk, int64_t head_dim = 2) {
  DecoderConfig c = svariant_config(heads, kv_heads, head_dim);
  c.softmax.heads = "moh";
  c.softmax.moh.shared = shared;
  c.softmax.moh.topk = topk;
  return c;
}

std::vector<std::string> names(const Module& m) {
  std::vector<std::string> out;
  for (const auto& p : m.named_parameters()) out.push_back(p.name);
  return out;
}

TEST(MohAttention, ParameterNamesAndShapes) {
  SoftmaxAttention one(moh_config(4, 4, 1, 2), 0);
  EXPECT_EQ(names(one), (std::vector<std::string>{"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                                  "router_proj.weight", "mix_proj.weight"}));
  EXPECT_EQ(one.named_parameters()[4].var.shape(), (Shape{3, 8}));  // (E, C)
  EXPECT_EQ(one.named_parameters()[5].var.shape(), (Shape{2, 8}));
  SoftmaxAttention two(moh_config(4, 2, 2, 1), 0);
  EXPECT_EQ(names(two)[5], "shared_router_proj.weight");
  EXPECT_EQ(two.named_parameters()[5].var.shape(), (Shape{2, 8}));  // (h_s, C)
  SoftmaxAttention none(moh_config(4, 4, 0, 2), 0);
  EXPECT_EQ(names(none).size(), 5u);  // no shared head: no mix_proj
}

// Zero W_r, W_s, W_h and k = E: p = 1/E, g_r = k·(1/E)/(k/E) = 1, g_s =
// h_s·(1/h_s) = 1, α = 1 each, so gate = 1 and the layer is the plain one.
TEST(MohAttention, UniformRouterWithAllHeadsEqualsPlainAttention) {
  for (int64_t shared : {0, 1, 2}) {
    DecoderConfig c = moh_config(4, 2, shared, 4 - shared);
    SoftmaxAttention moh(c, 0);
    moh.initialize(31, 0.4, 1);
    for (const auto& p : moh.named_parameters())
      if (p.name.find("_proj") != std::string::npos && p.name.find("router") != std::string::npos) Tensor(p.var.data()).fill_(0);
    if (shared > 0) testing::fill_parameter(moh, "mix_proj.weight", 0.0);
    c.softmax.heads = "dense";
    SoftmaxAttention plain(c, 0);
    testing::copy_shared_parameters(moh, plain);
    Tensor x = testing::random_tensor({2, 6, 8}, 8);
    Tensor pos = default_positions(6);
    testing::MixerRun r = testing::run_mixer(moh, x, pos);
    EXPECT_TENSOR_CLOSE(r.y, testing::run_mixer(plain, x, pos).y, 1e-12, 1e-13) << "shared " << shared;
    // Every head routed for every token: f_i = 1, p_i = 1/E, aux = E · Σ_i (1/E)·1 = E (= k here;
    // in general a perfectly balanced router gives k, since Σ_i f_i = k).
    EXPECT_NEAR(r.ctx.stat("layer0.moh.aux"), static_cast<double>(4 - shared), 1e-12);
  }
}

// H = 3, h_s = 1, E = 2, k = 1, T = 3: aux = E · Σ_i mean_t(p_ti) · f_i by hand.
TEST(MohAttention, AuxLossMatchesHandComputation) {
  DecoderConfig c = moh_config(3, 3, 1, 1);
  c.n_layers = 2;  // two S layers are MoH: the loss added is aux_coef · aux / 2
  c.softmax.moh.aux_coef = 0.1;
  SoftmaxAttention m(c, 1);
  m.initialize(41, 0.4, 2);
  Tensor w = testing::parameters_by_name(m)["router_proj.weight"];  // (2, 8)
  std::vector<double> wv(16, 0.0);
  wv[0] = 1.0;   // logit 0 = x[., 0]
  wv[9] = 1.0;   // logit 1 = x[., 1]
  w.copy_(Tensor::from_vector(wv, {2, 8}));
  std::vector<double> xv(24, 0.0);
  double x0[3] = {2.0, 0.5, -1.0}, x1[3] = {0.0, 1.5, 0.5};
  for (int t = 0; t < 3; ++t) xv[t * 8] = x0[t], xv[t * 8 + 1] = x1[t];
  Tensor x = Tensor::from_vector(xv, {1, 3, 8});
  double pbar[2] = {0, 0}, f[2] = {0, 0};
  for (int t = 0; t < 3; ++t) {
    double p0 = 1.0 / (1.0 + std::exp(x1[t] - x0[t]));
    pbar[0] += p0 / 3, pbar[1] += (1 - p0) / 3;
    f[p0 > 0.5 ? 0 : 1] += 1.0 / 3;  // routed: token 0 -> head 0, tokens 1, 2 -> head 1
  }
  double expected = 2 * (pbar[0] * f[0] + pbar[1] * f[1]);
  testing::MixerRun r = testing::run_mixer(m, x, default_positions(3));
  EXPECT_NEAR(r.ctx.stat("layer1.moh.aux"), expected, 1e-12);
  // The heads' loads come from one counts tensor and share its host copy (one wait for all).
  EXPECT_EQ(r.ctx.deferred_stats.at("layer1.moh.head1.load").host,
            r.ctx.deferred_stats.at("layer1.moh.head2.load").host);
  EXPECT_NEAR(r.ctx.stat("layer1.moh.head1.load"), 1.0 / 3, 1e-12);  // routed head 0 = head 1 of the layer
  EXPECT_NEAR(r.ctx.stat("layer1.moh.head2.load"), 2.0 / 3, 1e-12);
  ASSERT_EQ(r.ctx.aux_losses.size(), 1u);
  EXPECT_NEAR(r.ctx.aux_losses[0].item(), 0.1 * expected / 2, 1e-14);
}

TEST(MohAttention, OneSharedHeadGradientsMatchFiniteDifferences) {
  DecoderConfig c = moh_config(4, 4, 1, 2);
  c.softmax.moh.aux_coef = 0.5;  // large, so the aux gradient is checked too
  SoftmaxAttention m(c, 0);
  m.initialize(51, 0.6, 1);
  Tensor x = testing::random_tensor({1, 6, 8}, 9);
  ASSERT_GT(testing::min_topk_gap(m, x, 2), 1e-3);
  EXPECT_TRUE(testing::mixer_gradcheck(m, x, default_positions(6)));
}

TEST(MohAttention, TwoSharedHeadsGqaGradientsMatchFiniteDifferences) {
  DecoderConfig c = moh_config(4, 2, 2, 1, 3 + 1);
  c.softmax.moh.aux_coef = 0.5;
  SoftmaxAttention m(c, 0);
  m.initialize(52, 0.6, 1);
  Tensor x = testing::random_tensor({1, 7, 8}, 10);
  ASSERT_GT(testing::min_topk_gap(m, x, 1), 1e-3);
  EXPECT_TRUE(testing::mixer_gradcheck(m, x, default_positions(7)));
}

// The decoder adds every MoH layer's weighted aux loss to the training loss.
TEST(MohAttention, DecoderLossIncludesTheAuxLosses) {
  DecoderConfig c = moh_config(4, 2, 1, 2);
  c.n_layers = 2;
  c.softmax.moh.aux_coef = 0.3;
  DecoderLM model(c);
  model.initialize(61, 0.3, 2);
  Tensor ids = testing::random_indices({2, 5}, 11, 3), targets = testing::random_indices({2, 5}, 11, 4);
  SequenceContext ctx;
  double loss = model.loss(ids, targets, ctx).item();
  ASSERT_EQ(ctx.aux_losses.size(), 2u);
  double aux = ctx.stat("layer0.moh.aux") + ctx.stat("layer1.moh.aux");
  SequenceContext plain_ctx;
  Variable logits = model.forward(ids, plain_ctx);
  double ce = cross_entropy(reshape(logits, {10, 11}), targets.reshape({10})).item();
  EXPECT_NEAR(loss, ce + 0.3 * aux / 2, 1e-12);
}

TEST(MohAttention, BadOptionsNameTheValues) {
  DecoderConfig c = moh_config(4, 4, 4, 1);
  EXPECT_ERROR_MENTIONS(SoftmaxAttention(c, 0), {"model.S.moh.shared = 4", "n_heads = 4"});
  c = moh_config(4, 4, 1, 4);
  EXPECT_ERROR_MENTIONS(SoftmaxAttention(c, 0), {"model.S.moh.topk = 4", "n_heads - shared = 3"});
  c = moh_config(4, 4, 1, 0);
  EXPECT_ERROR_MENTIONS(SoftmaxAttention(c, 0), {"model.S.moh.topk = 0"});
  c = moh_config(4, 4, 1, 1);
  c.softmax.heads = "mixture";
  EXPECT_ERROR_MENTIONS(SoftmaxAttention(c, 0), {"model.S.heads", "mixture"});
}

}  // namespace
}  // namespace loom
