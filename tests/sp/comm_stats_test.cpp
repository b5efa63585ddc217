// Communication accounting (parallel/comm_stats.h): the counting communicator
// adds the documented volumes, and how traffic scales with the sequence
// length: LASP-2 sends the same bytes at any T (states only), while gathering
// K and V (LASP-2H) grows linearly in T.
#include <gtest/gtest.h>

#include "framework/ops.h"
#include "parallel/allgather_attention.h"
#include "parallel/comm_stats.h"
#include "parallel/lasp2.h"
#include "parallel/ring_attention.h"
#include "parallel/sp_collectives.h"
#include "tests/sp/sp_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

// Bytes one forward + backward of LASP-2 sends on this rank at sequence length `t`.
double lasp2_bytes(Communicator& cp, LayoutKind kind, int64_t t) {
  CommStats stats(cp);
  TokenLayout layout(kind, t, cp.size());
  const int64_t local = layout.local_len();
  Variable q(testing::random_tensor({1, local, 2, 4}, 1, DType::f32), true);
  Variable k(testing::random_tensor({1, local, 2, 4}, 2, DType::f32), true);
  Variable v(testing::random_tensor({1, local, 2, 4}, 3, DType::f32), true);
  Tensor lambdas = Tensor::from_vector(std::vector<double>{0.0, 0.5}, {2});
  sum(lasp2_attention(q, k, v, lambdas, 0.5, 8, layout, stats.counted("L"))).backward();
  return stats.bytes("L");
}

// Bytes one forward + backward of ring or all-gather softmax attention sends at length `t`.
double softmax_bytes(Communicator& cp, bool ring, int64_t t) {
  CommStats stats(cp);
  TokenLayout layout(LayoutKind::zigzag, t, cp.size());
  const int64_t local = layout.local_len();
  Variable q(testing::random_tensor({1, local, 2, 4}, 1, DType::f32), true);
  Variable k(testing::random_tensor({1, local, 1, 4}, 2, DType::f32), true);
  Variable v(testing::random_tensor({1, local, 1, 4}, 3, DType::f32), true);
  AttentionOptions options;
  options.causal = true;
  Communicator& comm = stats.counted("S");
  Variable out = ring ? ring_attention(q, k, v, options, layout, comm).out
                      : allgather_attention(q, k, v, options, layout, comm).out;
  sum(out).backward();
  return stats.bytes("S");
}

// Bytes of all-gathering K and V forward and reduce-scattering their gradients (LASP-2H's pattern).
double gather_kv_bytes(Communicator& cp, int64_t t) {
  CommStats stats(cp);
  const int64_t local = t / cp.size();
  Variable k(testing::random_tensor({1, local, 2, 4}, 2, DType::f32), true);
  Variable v(testing::random_tensor({1, local, 2, 4}, 3, DType::f32), true);
  Communicator& comm = stats.counted("S");
  sum(add(sp::all_gather(k, comm, 1), sp::all_gather(v, comm, 1))).backward();
  return stats.bytes("S");
}

TEST(CommStats, Lasp2TrafficIsIndependentOfSequenceLength) {
  LOOM_SP_GROUP(cp, 2);
  for (LayoutKind kind : {LayoutKind::contiguous, LayoutKind::zigzag}) {
    const int units = kind == LayoutKind::zigzag ? 2 : 1;
    // One all-gather of f32 states (U, B=1, H=2, D=4, D=4) forward, one of dP backward.
    const double expected = 2.0 * (cp->size() - 1) * units * 2 * 4 * 4 * 4;
    for (int64_t t : {16, 64, 256}) EXPECT_EQ(lasp2_bytes(*cp, kind, t), expected) << "T = " << t;
  }
}

TEST(CommStats, AllGatherTrafficGrowsLinearlyWithSequenceLength) {
  LOOM_SP_GROUP(cp, 2);
  const double at16 = gather_kv_bytes(*cp, 16), at64 = gather_kv_bytes(*cp, 64);
  EXPECT_GT(at16, 0);
  EXPECT_DOUBLE_EQ(at64, 4 * at16);
  // Forward: (P-1)·n per tensor; backward reduce-scatter: (P-1)/P·(P·n).
  const double n = 16.0 / cp->size() * 2 * 4 * 4;
  EXPECT_DOUBLE_EQ(at16, 2 * ((cp->size() - 1) * n + (cp->size() - 1) * n));
}

TEST(CommStats, RingAndAllGatherAttentionTrafficGrowsLinearly) {
  LOOM_SP_GROUP(cp, 2);
  for (bool ring : {true, false}) {
    const double at16 = softmax_bytes(*cp, ring, 16), at64 = softmax_bytes(*cp, ring, 64);
    EXPECT_GT(at16, 0) << (ring ? "ring" : "allgather");
    // K, V (and under ring their accumulators) scale with T; positions travel too, also linear.
    EXPECT_NEAR(at64 / at16, 4.0, 1e-9) << (ring ? "ring" : "allgather") << ": " << at16 << " -> " << at64;
    // LASP-2 on the same shapes sends less once T is large, and never more as T grows.
    EXPECT_LT(lasp2_bytes(*cp, LayoutKind::zigzag, 64), at64);
  }
}

TEST(CommStats, CountsEachCollectiveAndResets) {
  Communicator& world = testing::mpi_context().world();
  const double p = world.size();
  CommStats stats(world);
  Communicator& a = stats.counted("a");
  Tensor t = Tensor::ones({10}, DType::f32);  // 40 bytes
  a.all_reduce(t, ReduceOp::sum, testing::cpu_stream());
  EXPECT_DOUBLE_EQ(stats.bytes("a"), 2 * (p - 1) / p * 40);
  Tensor out = Tensor::empty({10 * world.size()}, DType::f32);
  stats.counted("b").all_gather(out, t, testing::cpu_stream());
  EXPECT_DOUBLE_EQ(stats.bytes("b"), (p - 1) * 40);
  EXPECT_EQ(&stats.counted("a"), &a);
  EXPECT_EQ(stats.bytes().size(), 2u);
  stats.reset();
  EXPECT_EQ(stats.bytes("a"), 0);
  EXPECT_EQ(stats.bytes("never"), 0);
}

}  // namespace
}  // namespace loom
