// S2 block-sparse attention (ALGORITHMS.md §7): the block rule, the coverage
// rule of the heads' shards and its warning, the attention op against dense
// attention with the same explicit per-element mask (outputs and gradients,
// MHA and GQA, global position offsets, T not a multiple of the block), and
// the S2 mixer alone and composed with the gate and MoH.
#include <limits>

#include "tests/svariants/svariant_testing.h"

namespace loom {
namespace {

using testing::svariant_config;

TEST(S2Pattern, BlockRuleByHand) {
  S2Pattern p{2, 1, 4};  // Bs 2, local 1, vert_stride 4
  // 2 patterns: stride_offset = 4 / 2 = 2; pattern 0 takes j % 4 == 0, pattern 1 takes (j + 2) % 4 == 0.
  EXPECT_EQ(s2_stride_offset(4, 2), 2);
  EXPECT_TRUE(s2_block_active(5, 5, 0, 2, p));   // diagonal
  EXPECT_FALSE(s2_block_active(5, 6, 0, 2, p));  // future block
  EXPECT_TRUE(s2_block_active(5, 4, 0, 2, p));
  EXPECT_FALSE(s2_block_active(5, 4, 1, 2, p));
  EXPECT_TRUE(s2_block_active(5, 2, 1, 2, p));
  EXPECT_FALSE(s2_block_active(5, 3, 0, 2, p));
  EXPECT_FALSE(s2_block_active(5, 3, 1, 2, p));  // residue 1 and 3: nobody (2 patterns < vert_stride 4)
  EXPECT_EQ(s2_stride_offset(4, 8), 1);           // more patterns than the stride: offset 1
  S2Pattern wide{2, 3, 4};
  EXPECT_TRUE(s2_block_active(5, 3, 0, 2, wide));  // inside the local window of 3 blocks
}

// Brute force: every block (i, j <= i) is attended by some pattern iff there
// are at least vert_stride patterns, which is what s2_covers_context says.
TEST(S2Pattern, UnionOfHeadsCoversTheContextIffEnoughPatterns) {
  for (int64_t vs = 1; vs <= 6; ++vs)
    for (int64_t patterns = 1; patterns <= 8; ++patterns)
      for (int64_t local = 1; local <= 2; ++local) {
        S2Pattern p{4, local, vs};
        int64_t blocks = local + 3 * vs + 2;
        bool covered = true;
        for (int64_t i = 0; i < blocks; ++i)
          for (int64_t j = 0; j <= i; ++j) {
            bool any = false;
            for (int64_t h = 0; h < patterns; ++h) any = any || s2_block_active(i, j, h, patterns, p);
            covered = covered && any;
          }
        EXPECT_EQ(covered, s2_covers_context(patterns, vs)) << "vs " << vs << " patterns " << patterns;
      }
}

TEST(S2Pattern, WarningWhenKvHeadsDoNotCoverTheContext) {
  SoftmaxOptions o;
  o.sparsity = "s2";
  o.s2 = S2Options{2, 1, 4};
  EXPECT_EQ(s2_coverage_warning(o, 8, 4, 0), "");
  std::string w = s2_coverage_warning(o, 8, 2, 3);  // GQA: 2 kv heads = 2 patterns < 4
  EXPECT_NE(w.find("layer 3"), std::string::npos) << w;
  EXPECT_NE(w.find("2 distinct head patterns"), std::string::npos) << w;
  EXPECT_NE(w.find("vert_stride = 4"), std::string::npos) << w;
  o.sparsity = "dense";
  EXPECT_EQ(s2_coverage_warning(o, 8, 2, 3), "");
}

// Dense attention with an explicit additive mask built from the rule, element by element.
Variable masked_dense_attention(const Variable& q, const Variable& k, const Variable& v, const std::vector<int64_t>& qpos,
                                const std::vector<int64_t>& kpos, const S2Pattern& p) {
  int64_t b = q.size(0), t = q.size(1), h = q.size(2), d = q.size(3), s = k.size(1), hkv = k.size(2);
  std::vector<double> bias(static_cast<size_t>(h * t * s), 0.0);
  for (int64_t hh = 0; hh < h; ++hh)
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < s; ++j) {
        bool visible = kpos[j] <= qpos[i] && s2_block_active(qpos[i] / p.block, kpos[j] / p.block, hh / (h / hkv), hkv, p);
        bias[static_cast<size_t>((hh * t + i) * s + j)] = visible ? 0.0 : -1e300;
      }
  std::vector<Variable> kh, vh;
  for (int64_t hh = 0; hh < h; ++hh) {
    kh.push_back(narrow(k, 2, hh / (h / hkv), 1));
    vh.push_back(narrow(v, 2, hh / (h / hkv), 1));
  }
  Variable kr = permute(concat(kh, 2), {0, 2, 3, 1});  // (B, H, D, S)
  Variable vr = permute(concat(vh, 2), {0, 2, 1, 3});  // (B, H, S, D)
  Variable qr = permute(q, {0, 2, 1, 3});              // (B, H, T, D)
  Variable scores = add(scale(matmul(qr, kr), 1.0 / std::sqrt(static_cast<double>(d))),
                        Variable(Tensor::from_vector(bias, {1, h, t, s})));  // (B, H, T, S)
  Variable out = matmul(softmax(scores, -1), vr);                            // (B, H, T, D)
  (void)b;
  return permute(out, {0, 2, 1, 3});  // (B, T, H, D)
}

std::vector<int64_t> range(int64_t start, int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = start + i;
  return v;
}

TEST(S2AttentionOp, EqualsDenseAttentionWithTheSameMask) {
  struct Case {
    int64_t h, hkv, t, s, q0, k0;
    S2Pattern p;
  };
  // (heads, kv heads, T, S, first query / key position, pattern): T not a
  // multiple of the block, offsets so blocks are by global position, and a
  // query chunk after its key chunk (as a ring step sees it).
  for (const Case& c : {Case{4, 4, 9, 9, 0, 0, {2, 1, 2}}, Case{4, 2, 11, 11, 3, 3, {3, 1, 4}},
                        Case{2, 1, 7, 7, 5, 5, {2, 2, 3}}, Case{4, 2, 5, 7, 12, 4, {2, 1, 2}},
                        Case{4, 4, 13, 13, 0, 0, {1, 2, 3}}}) {
    Tensor qt = testing::random_tensor({2, c.t, c.h, 3}, 1), kt = testing::random_tensor({2, c.s, c.hkv, 3}, 2),
           vt = testing::random_tensor({2, c.s, c.hkv, 3}, 3), dout = testing::random_tensor({2, c.t, c.h, 3}, 4);
    std::vector<int64_t> qpos = range(c.q0, c.t), kpos = range(c.k0, c.s);
    AttentionOptions o;
    o.q_positions = Tensor::from_vector(qpos, {c.t});
    o.k_positions = Tensor::from_vector(kpos, {c.s});
    o.s2 = c.p;
    Variable q1(qt, true), k1(kt, true), v1(vt, true), q2(qt, true), k2(kt, true), v2(vt, true);
    Variable sparse = attention(q1, k1, v1, o).out;
    Variable dense = masked_dense_attention(q2, k2, v2, qpos, kpos, c.p);
    EXPECT_TENSOR_CLOSE(sparse.data(), dense.data(), 1e-12, 1e-13);
    sparse.backward(dout);
    dense.backward(dout);
    EXPECT_TENSOR_CLOSE(q1.grad(), q2.grad(), 1e-11, 1e-12);
    EXPECT_TENSOR_CLOSE(k1.grad(), k2.grad(), 1e-11, 1e-12);
    EXPECT_TENSOR_CLOSE(v1.grad(), v2.grad(), 1e-11, 1e-12);
    // And it is sparse: differs from plain causal attention.
    AttentionOptions causal = o;
    causal.s2 = S2Pattern{};
    EXPECT_FALSE(testing::tensors_close(attention(Variable(qt), Variable(kt), Variable(vt), causal).out.data(),
                                        sparse.data(), 0, 1e-6));
  }
}

TEST(S2AttentionOp, GradientsMatchFiniteDifferencesWithLse) {
  AttentionOptions o;
  o.q_positions = Tensor::from_vector(range(1, 7), {7});
  o.k_positions = Tensor::from_vector(range(1, 7), {7});
  o.s2 = S2Pattern{2, 1, 2};
  auto fn = [&](const std::vector<Variable>& in) {
    AttentionResult r = attention(in[0], in[1], in[2], o);
    return std::vector<Variable>{r.out, r.lse};
  };
  EXPECT_GRADCHECK(fn, {testing::random_tensor({1, 7, 4, 2}, 5), testing::random_tensor({1, 7, 2, 2}, 6),
                        testing::random_tensor({1, 7, 2, 2}, 7)});
}

TEST(S2AttentionOp, BadOptionsNameTheValues) {
  Variable q(testing::random_tensor({1, 4, 2, 2}, 1)), kv(testing::random_tensor({1, 4, 2, 2}, 2));
  AttentionOptions o;
  o.s2 = S2Pattern{2, 0, 2};
  EXPECT_ERROR_MENTIONS(attention(q, kv, kv, o), {"attention", "local_blocks = 0"});
  o.s2 = S2Pattern{2, 1, 2};
  o.causal = false;
  EXPECT_ERROR_MENTIONS(attention(q, kv, kv, o), {"attention", "block = 2", "causal"});
  o.causal = true;
  o.q_positions = Tensor::from_vector(std::vector<int64_t>{-1, 0, 1, 2}, {4});
  EXPECT_ERROR_MENTIONS(attention(q, kv, kv, o), {"attention", "non-negative", "-1"});
  o = AttentionOptions{};
  o.s2.block = -2;
  EXPECT_ERROR_MENTIONS(attention(q, kv, kv, o), {"attention", "block = -2"});
}

DecoderConfig s2_config(int64_t heads, int64_t kv_heads, int64_t head_dim) {
  DecoderConfig c = svariant_config(heads, kv_heads, head_dim);
  c.softmax.sparsity = "s2";
  c.softmax.s2 = S2Options{2, 1, 2};
  return c;
}

TEST(S2Attention, MixerGradientsMatchFiniteDifferences) {
  SoftmaxAttention m(s2_config(4, 4, 2), 0);
  m.initialize(71, 0.5, 1);
  EXPECT_TRUE(testing::mixer_gradcheck(m, testing::random_tensor({1, 9, 8}, 11), default_positions(9)));
}

TEST(S2Attention, GqaMixerGradientsMatchFiniteDifferences) {
  SoftmaxAttention m(s2_config(4, 2, 3 + 1), 0);
  m.initialize(72, 0.5, 1);
  EXPECT_TRUE(testing::mixer_gradcheck(m, testing::random_tensor({1, 7, 8}, 12), default_positions(7, 1)));
}

// Gate, MoH and S2 in one layer, GQA; then the other gate kind with MHA.
TEST(S2Attention, ComposedWithGateAndMohGradientsMatchFiniteDifferences) {
  DecoderConfig c = s2_config(4, 2, 2);
  c.softmax.gate = "elementwise";
  c.softmax.heads = "moh";
  c.softmax.moh = MohOptions{2, 1, 0.5};
  SoftmaxAttention m(c, 0);
  m.initialize(73, 0.6, 1);
  Tensor x = testing::random_tensor({1, 9, 8}, 13);
  ASSERT_GT(testing::min_topk_gap(m, x, 1), 1e-3);
  EXPECT_TRUE(testing::mixer_gradcheck(m, x, default_positions(9)));
  c = s2_config(4, 4, 2);
  c.softmax.gate = "headwise";
  c.softmax.heads = "moh";
  c.softmax.moh = MohOptions{1, 2, 0.5};
  SoftmaxAttention m2(c, 0);
  m2.initialize(74, 0.6, 1);
  Tensor x2 = testing::random_tensor({1, 8, 8}, 14);
  ASSERT_GT(testing::min_topk_gap(m2, x2, 2), 1e-3);
  EXPECT_TRUE(testing::mixer_gradcheck(m2, x2, default_positions(8, 2)));
}

TEST(S2Attention, ConstructionWarnsOnceWhenShardsMissBlocks) {
  DecoderConfig c = s2_config(4, 2, 2);
  c.softmax.s2.vert_stride = 4;  // 2 kv-head patterns < 4
  ::testing::internal::CaptureStderr();
  SoftmaxAttention sparse(c, 5);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("layer 5"), std::string::npos) << err;
  EXPECT_EQ(err.find("warning", err.find("warning") + 1), std::string::npos) << err;  // once
  c.softmax.s2.vert_stride = 2;
  ::testing::internal::CaptureStderr();
  SoftmaxAttention covered(c, 5);
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

TEST(S2Attention, BadOptionsNameTheValues) {
  DecoderConfig c = s2_config(4, 4, 2);
  c.softmax.s2.block = 0;
  EXPECT_ERROR_MENTIONS(SoftmaxAttention(c, 0), {"model.S.s2", "block = 0"});
  c = s2_config(4, 4, 2);
  c.softmax.sparsity = "sparse";
  EXPECT_ERROR_MENTIONS(SoftmaxAttention(c, 0), {"model.S.sparsity", "sparse"});
}

}  // namespace
}  // namespace loom
