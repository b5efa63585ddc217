// TokenLayout: chunks per rank, global positions, shard/unshard round trips,
// and the errors for lengths that do not divide (loom rejects, never pads).
#include <gtest/gtest.h>

#include "parallel/token_layout.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

std::vector<int64_t> positions_of(const TokenLayout& layout, int rank) {
  return layout.positions(rank).to_vector<int64_t>();
}

TEST(TokenLayout, ContiguousChunks) {
  TokenLayout layout(LayoutKind::contiguous, 12, 3);
  EXPECT_EQ(layout.local_len(), 4);
  EXPECT_EQ(positions_of(layout, 0), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(positions_of(layout, 2), (std::vector<int64_t>{8, 9, 10, 11}));
  ASSERT_EQ(layout.chunks(1).size(), 1u);
  EXPECT_EQ(layout.chunks(1)[0].start, 4);
}

TEST(TokenLayout, ZigzagHoldsChunksRAndMirror) {
  TokenLayout layout(LayoutKind::zigzag, 12, 3);  // 6 chunks of 2
  EXPECT_EQ(positions_of(layout, 0), (std::vector<int64_t>{0, 1, 10, 11}));
  EXPECT_EQ(positions_of(layout, 1), (std::vector<int64_t>{2, 3, 8, 9}));
  EXPECT_EQ(positions_of(layout, 2), (std::vector<int64_t>{4, 5, 6, 7}));
  // Every position exactly once over the ranks.
  std::vector<int> seen(12, 0);
  for (int r = 0; r < 3; ++r)
    for (int64_t p : positions_of(layout, r)) seen[static_cast<size_t>(p)] += 1;
  for (int s : seen) EXPECT_EQ(s, 1);
}

TEST(TokenLayout, ShardUnshardRoundTripAlongAnyDim) {
  for (LayoutKind kind : {LayoutKind::contiguous, LayoutKind::zigzag}) {
    for (int cp : {1, 2, 3, 4}) {
      const int64_t t = 24;
      TokenLayout layout(kind, t, cp);
      Tensor global = testing::random_tensor({2, t, 3}, 7 + cp);  // (B, T, C)
      std::vector<Tensor> shards;
      for (int r = 0; r < cp; ++r) {
        Tensor s = layout.shard(global, r, 1);  // (B, T/P, C)
        ASSERT_EQ(s.shape(), (Shape{2, t / cp, 3}));
        // The shard's tokens are the global tokens at layout.positions(r).
        std::vector<int64_t> pos = positions_of(layout, r);
        for (size_t i = 0; i < pos.size(); ++i)
          EXPECT_TENSOR_CLOSE(s.select(1, static_cast<int64_t>(i)), global.select(1, pos[i]), 0, 0);
        shards.push_back(s);
      }
      EXPECT_TENSOR_CLOSE(layout.unshard(shards, 1), global, 0, 0);
      Tensor ids = testing::random_indices({t}, 50, 3);  // (T) along dim 0 (and -1)
      std::vector<Tensor> id_shards;
      for (int r = 0; r < cp; ++r) id_shards.push_back(layout.shard(ids, r, -1));
      EXPECT_EQ(layout.unshard(id_shards, 0).to_vector<int64_t>(), ids.to_vector<int64_t>());
    }
  }
}

TEST(TokenLayout, LengthsThatDoNotDivideAreRejected) {
  std::string msg = testing::error_message([] { TokenLayout(LayoutKind::zigzag, 12, 4); });
  EXPECT_NE(msg.find("seq_len 12"), std::string::npos) << msg;
  EXPECT_NE(msg.find("multiple of 8"), std::string::npos) << msg;
  EXPECT_NE(msg.find("zigzag"), std::string::npos) << msg;
  msg = testing::error_message([] { TokenLayout(LayoutKind::contiguous, 10, 3); });
  EXPECT_NE(msg.find("seq_len 10"), std::string::npos) << msg;
  EXPECT_NE(msg.find("multiple of 3"), std::string::npos) << msg;
  EXPECT_EQ(testing::error_message([] { TokenLayout(LayoutKind::contiguous, 12, 4); }), "");
  msg = testing::error_message([] { parse_layout_kind("stripes"); });
  EXPECT_NE(msg.find("stripes"), std::string::npos) << msg;
  EXPECT_EQ(parse_layout_kind("zigzag"), LayoutKind::zigzag);
  msg = testing::error_message([] { TokenLayout(LayoutKind::contiguous, 12, 3).positions(3); });
  EXPECT_NE(msg.find("rank 3"), std::string::npos) << msg;
}

}  // namespace
}  // namespace loom
