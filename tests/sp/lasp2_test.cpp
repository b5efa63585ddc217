// LASP-2 (parallel/lasp2.h): on cp ranks, with either layout, the local outputs
// and the gradients of q, k, v equal the 1-rank lightning attention on the full
// sequence (sharded the same way). cp = 3 is odd on purpose; block sizes leave
// tails; heads have different decays (head 0 none).
#include <gtest/gtest.h>

#include "framework/ops.h"
#include "framework/ops_lightning.h"
#include "parallel/comm_stats.h"
#include "parallel/lasp2.h"
#include "tests/sp/sp_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

struct LaspCase {
  int64_t batch = 2, seq = 24, heads = 3, dim = 5, block = 4;
  double out_scale = 0.45;
};

void check_lasp2_equals_one_rank(Communicator& cp, LayoutKind kind, const LaspCase& c) {
  const int me = cp.rank();
  TokenLayout layout(kind, c.seq, cp.size());
  const Shape shape{c.batch, c.seq, c.heads, c.dim};
  Tensor lambdas = Tensor::from_vector(std::vector<double>{0.0, 0.3, 0.9}, {3}).narrow(0, 0, c.heads).contiguous();
  Tensor q = testing::random_tensor(shape, 1), k = testing::random_tensor(shape, 2), v = testing::random_tensor(shape, 3);
  Tensor w = testing::random_tensor(shape, 4);

  // 1 rank, whole sequence.
  Variable qg(q, true), kg(k, true), vg(v, true);
  Variable ref = lightning_attention(qg, kg, vg, lambdas, Variable(), c.out_scale, c.block).out;
  sum(mul(ref, Variable(w))).backward();

  // cp ranks, this rank's shard.
  Variable ql(layout.shard(q, me, 1), true), kl(layout.shard(k, me, 1), true), vl(layout.shard(v, me, 1), true);
  Variable out = lasp2_attention(ql, kl, vl, lambdas, c.out_scale, c.block, layout, cp);
  sum(mul(out, Variable(layout.shard(w, me, 1)))).backward();

  const double tol = 1e-11;
  EXPECT_TENSOR_CLOSE(out.data(), layout.shard(ref.data(), me, 1), tol, tol);
  EXPECT_TENSOR_CLOSE(ql.grad(), layout.shard(qg.grad(), me, 1), tol, tol);
  EXPECT_TENSOR_CLOSE(kl.grad(), layout.shard(kg.grad(), me, 1), tol, tol);
  EXPECT_TENSOR_CLOSE(vl.grad(), layout.shard(vg.grad(), me, 1), tol, tol);
}

class Lasp2Cp : public ::testing::TestWithParam<std::tuple<int, LayoutKind>> {};

TEST_P(Lasp2Cp, EqualsOneRankOnTheFullSequence) {
  const auto [cp_size, kind] = GetParam();
  LOOM_SP_GROUP(cp, cp_size);
  check_lasp2_equals_one_rank(*cp, kind, LaspCase{});
  LaspCase recurrent;  // the token-by-token kernel, one head, B = 1
  recurrent.batch = 1;
  recurrent.heads = 1;
  recurrent.block = 0;
  check_lasp2_equals_one_rank(*cp, kind, recurrent);
  LaspCase one_token;  // one token per chunk (zigzag at cp 4: 8 chunks)
  one_token.seq = kind == LayoutKind::zigzag ? 2 * cp_size : cp_size;
  one_token.block = 3;
  check_lasp2_equals_one_rank(*cp, kind, one_token);
}

INSTANTIATE_TEST_SUITE_P(Layouts, Lasp2Cp,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(LayoutKind::contiguous, LayoutKind::zigzag)),
                         [](const auto& info) {
                           return std::string(layout_kind_name(std::get<1>(info.param))) + "_cp" +
                                  std::to_string(std::get<0>(info.param));
                         });

TEST(Lasp2, UnitsAreInSequenceOrder) {
  TokenLayout zz(LayoutKind::zigzag, 12, 3);
  std::vector<LaspUnit> units = lasp2_units(zz);
  ASSERT_EQ(units.size(), 6u);
  const int ranks[] = {0, 1, 2, 2, 1, 0}, chunks[] = {0, 0, 0, 1, 1, 1};
  for (size_t i = 0; i < units.size(); ++i) {
    EXPECT_EQ(units[i].rank, ranks[i]) << i;
    EXPECT_EQ(units[i].chunk, chunks[i]) << i;
    EXPECT_EQ(units[i].tokens.start, 2 * static_cast<int64_t>(i));
  }
}

TEST(Lasp2, MismatchedShapesAreErrors) {
  Communicator& world = testing::mpi_context().world();
  TokenLayout layout(LayoutKind::contiguous, 4 * world.size(), world.size());
  Variable q(testing::random_tensor({1, 3, 2, 4}, 1));
  Tensor lambdas = Tensor::zeros({2}, DType::f64);
  std::string msg = testing::error_message([&] { lasp2_attention(q, q, q, lambdas, 1.0, 4, layout, world); });
  EXPECT_NE(msg.find("has 3 tokens"), std::string::npos) << msg;
  TokenLayout other(LayoutKind::contiguous, 8 * (world.size() + 1), world.size() + 1);
  msg = testing::error_message([&] { lasp2_attention(q, q, q, lambdas, 1.0, 4, other, world); });
  EXPECT_NE(msg.find("layout for cp"), std::string::npos) << msg;
}

}  // namespace
}  // namespace loom
