// LASP-2H all-gather attention (parallel/allgather_attention.h): P ranks equal
// the 1-rank attention op over the whole sequence (outputs, lse, gradients of
// q, k, v) for cp 2, 3, 4, both layouts, plain / GQA / S2, f64 and f32; empty
// rows; one collective each way with bytes linear in T; a 1-rank gradcheck.
#include <gtest/gtest.h>

#include <algorithm>

#include "parallel/comm_stats.h"
#include "parallel/allgather_attention.h"
#include "parallel/ring_attention.h"
#include "tests/sp/sp_attention_testing.h"

namespace loom::testing {
namespace {

class AllGatherAttentionEquivalence : public ::testing::TestWithParam<SpCase> {};

TEST_P(AllGatherAttentionEquivalence, EqualsSingleRankAttention) {
  const SpCase c = GetParam();
  std::unique_ptr<MpiCommunicator> group = first_ranks(c.cp);
  LOOM_SKIP_UNLESS_RANKS(c.cp);
  if (!group) GTEST_SKIP() << "rank outside the first " << c.cp;
  SpAttentionStats stats = expect_matches_single_rank(kAllGather, c, *group);
  EXPECT_EQ(stats.forward_messages, 1);
  EXPECT_EQ(stats.backward_messages, 1);
  EXPECT_EQ(stats.forward_bytes_sent, allgather_attention_forward_bytes(c.B, c.T / c.cp, c.Hkv, c.D, c.dtype, c.cp));
  EXPECT_EQ(stats.backward_bytes_sent,
            allgather_attention_backward_bytes(c.B, c.T / c.cp, c.Hkv, c.D, c.dtype, c.cp));
}

INSTANTIATE_TEST_SUITE_P(Cases, AllGatherAttentionEquivalence, ::testing::ValuesIn(equivalence_cases()),
                         [](const ::testing::TestParamInfo<SpCase>& info) { return case_name(info.param); });

TEST(AllGatherAttention, NonCausalAndEmptyRows) { expect_noncausal_and_empty_rows_match(kAllGather); }

// The ring and the all-gather give the same values (both equal the 1-rank op;
// this pins them to each other at a size where zigzag chunks span several S2 blocks).
TEST(AllGatherAttention, AgreesWithRingAttention) {
  const int cp = std::min(4, mpi_context().world_size());
  std::unique_ptr<MpiCommunicator> group = first_ranks(cp);
  if (!group) GTEST_SKIP() << "rank outside the first " << cp;
  TokenLayout layout(LayoutKind::zigzag, 16 * cp, cp);
  const int64_t Tl = layout.local_len();
  AttentionOptions o;
  o.s2 = S2Pattern{3, 2, 4};
  Tensor q = random_tensor({1, Tl, 4, 8}, 1 + group->rank()), k = random_tensor({1, Tl, 2, 8}, 10 + group->rank());
  Tensor v = random_tensor({1, Tl, 2, 8}, 20 + group->rank());
  Variable q1(q, true), k1(k, true), v1(v, true), q2(q, true), k2(k, true), v2(v, true);
  AttentionResult ring = ring_attention(q1, k1, v1, o, layout, *group);
  AttentionResult gathered = allgather_attention(q2, k2, v2, o, layout, *group);
  Tensor dout = random_tensor(ring.out.shape(), 30), dlse = random_tensor(ring.lse.shape(), 31);
  run_backward({ring.out, ring.lse}, {dout, dlse});
  run_backward({gathered.out, gathered.lse}, {dout, dlse});
  EXPECT_TENSOR_CLOSE(gathered.out.data(), ring.out.data(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(gathered.lse.data(), ring.lse.data(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(q2.grad(), q1.grad(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(k2.grad(), k1.grad(), 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(v2.grad(), v1.grad(), 1e-12, 1e-12);
}

// Traffic: one all-gather of the Hkv heads (and positions) forward, one
// reduce-scatter of dK, dV backward; linear in T, independent of H.
TEST(AllGatherAttention, BytesSentAreKvHeadsOnlyAndLinearInT) {
  const int cp = std::min(4, mpi_context().world_size());
  std::unique_ptr<MpiCommunicator> group = first_ranks(cp);
  if (!group) GTEST_SKIP() << "rank outside the first " << cp;
  auto bytes = [&](int64_t T, int64_t H) { return bytes_sent(kAllGather, *group, LayoutKind::contiguous, T, H); };
  const int64_t T0 = 4 * cp;
  const auto base = bytes(T0, 2);
  EXPECT_EQ(bytes(T0, 4), base) << "query heads must not travel";
  EXPECT_EQ(base.first, (cp - 1) * (T0 / cp) * (8 + 2 * 2 * 4 * 4));  // positions + K, V of the P - 1 other blocks
  EXPECT_EQ(base.second, (cp - 1) * (T0 / cp) * (2 * 2 * 4 * 4));     // dK, dV of the P - 1 other blocks
  for (int64_t factor : {2, 3}) {
    const auto scaled = bytes(factor * T0, 2);
    EXPECT_EQ(scaled.first, factor * base.first) << "T x " << factor;
    EXPECT_EQ(scaled.second, factor * base.second) << "T x " << factor;
  }
}

TEST(AllGatherAttention, GradcheckOneRank) { expect_gradcheck_one_rank(kAllGather); }

TEST(AllGatherAttention, BadInputsAreErrorsNamingTheValues) {
  std::unique_ptr<MpiCommunicator> self = self_group();
  Variable q(random_tensor({1, 8, 2, 4}, 1)), k(random_tensor({1, 8, 2, 4}, 2)), v(random_tensor({1, 8, 2, 4}, 3));
  EXPECT_NE(error_message([&] { allgather_attention(q, k, v, {}, TokenLayout(LayoutKind::zigzag, 8, 2), *self); })
                .find("cp = 2"),
            std::string::npos);
  Variable k_short(random_tensor({1, 4, 2, 4}, 2));
  EXPECT_NE(error_message([&] {
              allgather_attention(q, k_short, k_short, {}, TokenLayout(LayoutKind::zigzag, 8, 1), *self);
            }).find("local tokens"),
            std::string::npos);
}

}  // namespace
}  // namespace loom::testing
