// Gated softmax attention (ALGORITHMS.md §9): y = W_O · (o ⊙ σ(W_g x)),
// headwise and elementwise: parameter shapes, the gate's value at W_g = 0
// (σ = 0.5: the plain layer with o_proj halved), and whole-mixer gradients.
#include "tests/svariants/svariant_testing.h"

namespace loom {
namespace {

using testing::svariant_config;

TEST(GatedAttention, ParameterNamesAndShapes) {
  DecoderConfig c = svariant_config(4, 2, 3);
  c.softmax.gate = "headwise";
  SoftmaxAttention headwise(c, 0);
  auto params = headwise.named_parameters();
  ASSERT_EQ(params.size(), 5u);
  EXPECT_EQ(params[4].name, "gate_proj.weight");
  EXPECT_EQ(params[4].var.shape(), (Shape{4, 8}));  // (H, C)
  c.softmax.gate = "elementwise";
  SoftmaxAttention elementwise(c, 0);
  EXPECT_EQ(elementwise.named_parameters()[4].var.shape(), (Shape{12, 8}));  // (H*D, C)
  c.softmax.gate = "none";
  EXPECT_EQ(SoftmaxAttention(c, 0).named_parameters().size(), 4u);
}

// W_g = 0 gives σ(0) = 0.5 on every (token, head[, channel]): the output equals
// the plain layer whose o_proj is halved (o_proj is linear).
TEST(GatedAttention, ZeroGateWeightsHalveTheAttentionOutput) {
  for (const char* kind : {"headwise", "elementwise"}) {
    DecoderConfig c = svariant_config(4, 2, 2);
    SoftmaxAttention plain(c, 0);
    plain.initialize(11, 0.4, 1);
    c.softmax.gate = kind;
    SoftmaxAttention gated(c, 0);
    testing::copy_shared_parameters(plain, gated);
    testing::fill_parameter(gated, "gate_proj.weight", 0.0);
    Tensor x = testing::random_tensor({2, 7, 8}, 3);
    Tensor pos = default_positions(7, 2);
    Tensor y_gated = testing::run_mixer(gated, x, pos).y;
    Tensor y_plain = testing::run_mixer(plain, x, pos).y;
    EXPECT_FALSE(testing::tensors_close(y_gated, y_plain, 0, 1e-6)) << kind;  // the gate does act
    // Halve o_proj of the plain layer.
    Tensor w = testing::parameters_by_name(plain)["o_proj.weight"];
    std::vector<double> half = w.to_vector<double>();
    for (double& v : half) v *= 0.5;
    w.copy_(Tensor::from_vector(half, w.shape()));
    EXPECT_TENSOR_CLOSE(y_gated, testing::run_mixer(plain, x, pos).y, 1e-12, 1e-13) << kind;
  }
}

TEST(GatedAttention, HeadwiseGradientsMatchFiniteDifferences) {
  DecoderConfig c = svariant_config(4, 4, 2);
  c.softmax.gate = "headwise";
  SoftmaxAttention m(c, 0);
  m.initialize(21, 0.5, 1);
  EXPECT_TRUE(testing::mixer_gradcheck(m, testing::random_tensor({1, 6, 8}, 5), default_positions(6)));
}

TEST(GatedAttention, ElementwiseGqaGradientsMatchFiniteDifferences) {
  DecoderConfig c = svariant_config(4, 2, 4);
  c.softmax.gate = "elementwise";
  SoftmaxAttention m(c, 0);
  m.initialize(22, 0.5, 1);
  EXPECT_TRUE(testing::mixer_gradcheck(m, testing::random_tensor({1, 5, 8}, 6), default_positions(5, 3)));
}

TEST(GatedAttention, BadGateNamesTheValue) {
  DecoderConfig c = svariant_config();
  c.softmax.gate = "channelwise";
  EXPECT_ERROR_MENTIONS(SoftmaxAttention(c, 0), {"model.S.gate", "channelwise", "headwise"});
}

}  // namespace
}  // namespace loom
