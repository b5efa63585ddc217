// Ring attention (parallel/ring_attention.h): P ranks equal the 1-rank
// attention op over the whole sequence (outputs, lse and the gradients of q,
// k, v from a loss using both), for cp 2, 3, 4, both layouts, plain / GQA /
// S2, f64 and f32; empty rows; traffic (only Hkv heads, linear in T) and work
// (zigzag balance, skipped future shards) counters; the block planner against
// brute force. Tests needing more ranks than the run has skip with the reason.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "kernels/cpu/s2_pattern.h"
#include "parallel/comm_stats.h"
#include "parallel/ring_attention.h"
#include "tests/sp/sp_attention_testing.h"

namespace loom::testing {
namespace {

class RingAttentionEquivalence : public ::testing::TestWithParam<SpCase> {};

TEST_P(RingAttentionEquivalence, EqualsSingleRankAttention) {
  const SpCase c = GetParam();
  std::unique_ptr<MpiCommunicator> group = first_ranks(c.cp);
  LOOM_SKIP_UNLESS_RANKS(c.cp);
  if (!group) GTEST_SKIP() << "rank outside the first " << c.cp;
  SpAttentionStats stats = expect_matches_single_rank(kRing, c, *group);
  EXPECT_EQ(stats.forward_bytes_sent, ring_attention_forward_bytes(c.B, c.T / c.cp, c.Hkv, c.D, c.dtype, c.cp));
  EXPECT_EQ(stats.backward_bytes_sent, ring_attention_backward_bytes(c.B, c.T / c.cp, c.Hkv, c.D, c.dtype, c.cp));
}

INSTANTIATE_TEST_SUITE_P(Cases, RingAttentionEquivalence, ::testing::ValuesIn(equivalence_cases()),
                         [](const ::testing::TestParamInfo<SpCase>& info) { return case_name(info.param); });

// Non-causal attention (one block per step) and rows with no visible key at
// all (keys shifted 5 positions later: the first 5 queries see nothing, and
// with the zigzag split most blocks leave some rows empty): lse stays -inf,
// out 0, nothing NaN, gradients equal the 1-rank op's.
TEST(RingAttention, NonCausalAndEmptyRows) { expect_noncausal_and_empty_rows_match(kRing); }

// The test above compares -inf with -inf; this one looks at the rows directly.
TEST(RingAttention, EmptyRowsAreZeroWithMinusInfinityLse) {
  const int cp = std::min(3, mpi_context().world_size());
  std::unique_ptr<MpiCommunicator> group = first_ranks(cp);
  if (!group) GTEST_SKIP() << "rank outside the first " << cp;
  TokenLayout layout(LayoutKind::zigzag, 12, cp);
  const int rank = group->rank();
  AttentionOptions o;
  o.q_positions = layout.positions(rank);
  Tensor k_pos = layout.positions(rank).clone();
  for (int64_t i = 0; i < k_pos.numel(); ++i) k_pos.data<int64_t>()[i] += 4;  // queries 0..3 see no key
  o.k_positions = k_pos;
  const int64_t Tl = layout.local_len();
  Variable q(random_tensor({1, Tl, 2, 3}, 1, DType::f32), true), k(random_tensor({1, Tl, 1, 3}, 2, DType::f32), true);
  Variable v(random_tensor({1, Tl, 1, 3}, 3, DType::f32), true);
  AttentionResult r = ring_attention(q, k, v, o, layout, *group);
  run_backward({r.out, r.lse}, {Tensor::ones(r.out.shape(), DType::f32), Tensor::ones(r.lse.shape(), DType::f32)});
  const std::vector<int64_t> pos = layout.positions(rank).to_vector<int64_t>();
  const std::vector<float> lse = r.lse.data().to_vector<float>(), out = r.out.data().to_vector<float>();
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < Tl; ++i) {
      const float l = lse[h * Tl + i];
      if (pos[i] < 4) {
        EXPECT_TRUE(std::isinf(l) && l < 0) << "row " << i << " (position " << pos[i] << ") lse " << l;
        for (int64_t d = 0; d < 3; ++d) EXPECT_EQ(out[(i * 2 + h) * 3 + d], 0.0f) << "row " << i;
      } else {
        EXPECT_TRUE(std::isfinite(l)) << "row " << i << " (position " << pos[i] << ") lse " << l;
      }
    }
  for (const Variable* x : {&q, &k, &v})
    for (float g : x->grad().to_vector<float>()) ASSERT_TRUE(std::isfinite(g));
}

// Traffic: each hop carries only the Hkv heads (bytes do not depend on H),
// and the bytes per call grow linearly with the sequence length.
TEST(RingAttention, BytesSentAreKvHeadsOnlyAndLinearInT) {
  const int cp = std::min(4, mpi_context().world_size());
  std::unique_ptr<MpiCommunicator> group = first_ranks(cp);
  if (!group) GTEST_SKIP() << "rank outside the first " << cp;
  auto bytes = [&](int64_t T, int64_t H) { return bytes_sent(kRing, *group, LayoutKind::zigzag, T, H); };
  const int64_t T0 = 2 * cp * 2;
  const auto base = bytes(T0, 2);
  EXPECT_EQ(bytes(T0, 4), base) << "query heads must not travel";
  // (P - 1) hops of positions (8 bytes per token) and K, V (2 * Hkv * D * 4 bytes per token).
  EXPECT_EQ(base.first, (cp - 1) * (T0 / cp) * (8 + 2 * 2 * 4 * 4));
  // Backward: P - 1 hops of K, V and positions, P hops of the dK, dV accumulators (none for one rank).
  EXPECT_EQ(base.second,
            (cp - 1) * (T0 / cp) * (8 + 2 * 2 * 4 * 4) + (cp > 1 ? cp : 0) * (T0 / cp) * (2 * 2 * 4 * 4));
  for (int64_t factor : {2, 3, 5}) {
    const auto scaled = bytes(factor * T0, 2);
    EXPECT_EQ(scaled.first, factor * base.first) << "T x " << factor;
    EXPECT_EQ(scaled.second, factor * base.second) << "T x " << factor;
  }
  if (cp > 1) {
    EXPECT_GT(base.first, 0);
  }
}

// Work: under zigzag every rank computes the same number of (query, key)
// pairs (3/4 of a shard block on the diagonal step, half a block on each
// other step); under contiguous, rank r skips the P - 1 - r shards wholly in
// its future. Backward computes what forward did.
TEST(RingAttention, ZigzagBalancesWorkAndContiguousSkipsFutureShards) {
  for (int cp : {2, 3, 4}) {
    std::unique_ptr<MpiCommunicator> group = first_ranks(cp);
    if (mpi_context().world_size() < cp || !group) continue;
    for (LayoutKind kind : {LayoutKind::zigzag, LayoutKind::contiguous}) {
      TokenLayout layout(kind, 8 * cp, cp);
      const int64_t Tl = layout.local_len(), c = Tl / 2;
      Variable q(random_tensor({1, Tl, 2, 4}, 1), true), k(random_tensor({1, Tl, 1, 4}, 2), true);
      Variable v(random_tensor({1, Tl, 1, 4}, 3), true);
      SpAttentionStats stats;
      AttentionResult r = ring_attention(q, k, v, {}, layout, *group, &stats);
      run_backward({r.out}, {Tensor::ones(r.out.shape(), DType::f64)});
      const int rank = group->rank();
      SCOPED_TRACE(std::string(layout_kind_name(kind)) + " cp " + std::to_string(cp) + " rank " + std::to_string(rank));
      if (kind == LayoutKind::zigzag) {
        EXPECT_EQ(stats.forward_score_pairs, 3 * c * c + (cp - 1) * 2 * c * c);
        EXPECT_EQ(stats.forward_blocks, 2 + (cp - 1));
      } else {
        EXPECT_EQ(stats.forward_score_pairs, (rank + 1) * Tl * Tl);
        EXPECT_EQ(stats.forward_blocks, rank + 1);
      }
      EXPECT_EQ(stats.backward_score_pairs, stats.forward_score_pairs);
      EXPECT_EQ(stats.backward_blocks, stats.forward_blocks);
      // The counters are this rank's own: gather them to see the balance.
      Tensor mine = Tensor::from_vector<int64_t>({stats.forward_score_pairs}, {1});
      Tensor all = Tensor::empty({cp}, DType::i64);
      group->all_gather(all, mine, cpu_stream());
      const std::vector<int64_t> pairs = all.to_vector<int64_t>();
      if (kind == LayoutKind::zigzag) {
        EXPECT_EQ(std::set<int64_t>(pairs.begin(), pairs.end()).size(), 1u);
      }
    }
  }
}

// The planner against brute force, for every (rank, source) pair of both
// layouts at P = 1..4, dense causal and several S2 patterns: every visible
// (query, key) pair lies in exactly one block, no pair lies in two, and every
// (query run, key piece) the plan keeps holds some visible pair.
TEST(RingAttention, BlockPlanCoversVisiblePairsExactlyOnce) {
  std::vector<S2Pattern> patterns = {S2Pattern{}, S2Pattern{2, 1, 4}, S2Pattern{3, 2, 3}, S2Pattern{5, 1, 2},
                                     S2Pattern{4, 1, 8}};
  for (int P = 1; P <= 4; ++P)
    for (LayoutKind kind : {LayoutKind::zigzag, LayoutKind::contiguous})
      for (const S2Pattern& s2 : patterns)
        for (int64_t num_patterns : {1, 2}) {
          TokenLayout layout(kind, 12 * P, P);
          for (int r = 0; r < P; ++r)
            for (int src = 0; src < P; ++src) {
              Tensor qp = layout.positions(r), kp = layout.positions(src);
              const std::vector<int64_t> qv = qp.to_vector<int64_t>(), kv = kp.to_vector<int64_t>();
              const int64_t Tq = qp.numel(), Tk = kp.numel();
              auto visible = [&](int64_t i, int64_t j) {
                if (kv[j] > qv[i]) return false;
                if (!s2.enabled()) return true;
                for (int64_t pat = 0; pat < num_patterns; ++pat)
                  if (s2_block_active(qv[i] / s2.block, kv[j] / s2.block, pat, num_patterns, s2)) return true;
                return false;
              };
              std::vector<int> covered(Tq * Tk, 0);
              int64_t planned_pairs = 0;
              const int64_t chunk = layout.chunks(r).front().length;
              for (const AttentionBlock& b : plan_attention_blocks(qp, kp, true, s2, num_patterns, chunk)) {
                ASSERT_GT(b.q_len, 0);
                ASSERT_LE(b.q_start + b.q_len, Tq);
                ASSERT_FALSE(b.keys.empty());
                for (const KeyRange& kr : b.keys) {
                  ASSERT_GT(kr.len, 0);
                  ASSERT_LE(kr.start + kr.len, Tk);
                  bool any = false;
                  for (int64_t i = b.q_start; i < b.q_start + b.q_len; ++i)
                    for (int64_t j = kr.start; j < kr.start + kr.len; ++j) {
                      covered[i * Tk + j] += 1;
                      any = any || visible(i, j);
                    }
                  EXPECT_TRUE(any) << "a key range with no visible pair, rank " << r << " source " << src;
                }
                planned_pairs += b.q_len * b.k_len();
                // The block's mask form (what a fixed-diagonal backend, cuDNN, gets): without S2 every
                // block of these layouts is a diagonal, and the diagonal is the exact visibility.
                if (s2.enabled()) {
                  EXPECT_FALSE(b.form.is_diagonal());
                  continue;
                }
                ASSERT_TRUE(b.form.is_diagonal()) << "rank " << r << " source " << src << " block at " << b.q_start;
                int64_t jj = 0;
                for (const KeyRange& kr : b.keys)
                  for (int64_t j = kr.start; j < kr.start + kr.len; ++j, ++jj)
                    for (int64_t i = b.q_start; i < b.q_start + b.q_len; ++i)
                      ASSERT_EQ(visible(i, j), jj <= i - b.q_start + b.form.offset)
                          << "diagonal " << b.form.offset << " disagrees at query " << i << ", key " << j;
              }
              for (int64_t i = 0; i < Tq; ++i)
                for (int64_t j = 0; j < Tk; ++j) {
                  ASSERT_LE(covered[i * Tk + j], 1) << "pair (" << i << ", " << j << ") in two blocks";
                  if (visible(i, j)) {
                    ASSERT_EQ(covered[i * Tk + j], 1) << "visible pair (" << i << ", " << j << ") not planned, rank "
                                                      << r << " src " << src;
                  }
                }
              if (!s2.enabled() && kind == LayoutKind::zigzag && P > 1) {
                EXPECT_EQ(planned_pairs, r == src ? 3 * Tq * Tk / 4 : Tq * Tk / 2)
                    << "zigzag: 3/4 of a block on the diagonal, half a block on the other steps; rank " << r
                    << " source " << src;
              }
            }
        }
}

// S2 through the ring: key blocks that no local query needs in any head are
// not computed (here, with one pattern of stride 8 and no local window beyond
// the diagonal, most of a long context is skipped).
TEST(RingAttention, S2SkipsKeyBlocksNoHeadNeeds) {
  const int cp = std::min(2, mpi_context().world_size());
  std::unique_ptr<MpiCommunicator> group = first_ranks(cp);
  if (!group) GTEST_SKIP() << "rank outside the first " << cp;
  TokenLayout layout(LayoutKind::zigzag, 64, cp);
  const int64_t Tl = layout.local_len();
  Variable q(random_tensor({1, Tl, 1, 4}, 1), true), k(random_tensor({1, Tl, 1, 4}, 2), true);
  Variable v(random_tensor({1, Tl, 1, 4}, 3), true);
  SpAttentionStats dense, sparse;
  ring_attention(q, k, v, {}, layout, *group, &dense);
  AttentionOptions o;
  o.s2 = S2Pattern{2, 1, 8};
  ring_attention(q, k, v, o, layout, *group, &sparse);
  EXPECT_LT(2 * sparse.forward_score_pairs, dense.forward_score_pairs)
      << "S2 (block 2, stride 8) computed " << sparse.forward_score_pairs << " of " << dense.forward_score_pairs
      << " dense causal pairs";
}

TEST(RingAttention, GradcheckOneRank) { expect_gradcheck_one_rank(kRing); }

TEST(RingAttention, BadInputsAreErrorsNamingTheValues) {
  std::unique_ptr<MpiCommunicator> self = self_group();
  TokenLayout layout(LayoutKind::zigzag, 8, 1);
  Variable q(random_tensor({1, 8, 2, 4}, 1)), k(random_tensor({1, 8, 2, 4}, 2)), v(random_tensor({1, 8, 2, 4}, 3));
  EXPECT_NE(error_message([&] { ring_attention(q, k, v, {}, TokenLayout(LayoutKind::zigzag, 8, 2), *self); })
                .find("cp = 2"),
            std::string::npos);
  EXPECT_NE(error_message([&] { ring_attention(q, k, v, {}, TokenLayout(LayoutKind::zigzag, 16, 1), *self); })
                .find("local tokens"),
            std::string::npos);
  Variable k3(random_tensor({1, 8, 3, 4}, 2));
  EXPECT_NE(error_message([&] { ring_attention(q, k3, k3, {}, layout, *self); }).find("Hkv = 3"), std::string::npos);
  AttentionOptions o;
  o.causal = false;
  o.s2 = S2Pattern{2, 1, 2};
  EXPECT_NE(error_message([&] { ring_attention(q, k, v, o, layout, *self); }).find("needs causal"),
            std::string::npos);
  o = {};
  o.q_positions = Tensor::arange(5);
  EXPECT_NE(error_message([&] { ring_attention(q, k, v, o, layout, *self); }).find("q_positions shape (5,)"),
            std::string::npos);
}

}  // namespace
}  // namespace loom::testing
