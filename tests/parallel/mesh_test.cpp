// DeviceMesh: size resolution and its errors, the rank-order convention, and
// for every way to factor the actual world size into dp x cp x ep, the size,
// rank and members of every group.
#include <gtest/gtest.h>

#include "parallel/mesh.h"
#include "tests/parallel/parallel_testing.h"

namespace loom {
namespace {

using testing::cpu_stream;
using testing::error_message;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

TEST(DeviceMesh, ResolveSizes) {
  MeshSizes s = resolve_mesh_sizes({0, 2, 1}, 8);
  EXPECT_EQ(s.dp, 4);
  EXPECT_EQ(s.cp, 2);
  EXPECT_EQ(s.ep, 1);
  s = resolve_mesh_sizes({1, 3, 2}, 6);
  EXPECT_EQ(s.dp, 1);
  std::string msg = error_message([] { resolve_mesh_sizes({3, 1, 1}, 4); });
  EXPECT_TRUE(contains(msg, "dp=3 cp=1 ep=1") && contains(msg, "world=4")) << msg;
  msg = error_message([] { resolve_mesh_sizes({2, 2, 2}, 4); });
  EXPECT_TRUE(contains(msg, "dp=2 cp=2 ep=2") && contains(msg, "product 8") && contains(msg, "world=4")) << msg;
  msg = error_message([] { resolve_mesh_sizes({0, 3, 1}, 4); });
  EXPECT_TRUE(contains(msg, "dp=0 cp=3 ep=1") && contains(msg, "world=4")) << msg;
  msg = error_message([] { resolve_mesh_sizes({1, 0, 1}, 4); });
  EXPECT_TRUE(contains(msg, "positive") && contains(msg, "cp=0")) << msg;
  EXPECT_THROW(resolve_mesh_sizes({-1, 1, 1}, 1), Error);
}

TEST(DeviceMesh, RankOrderHasCpFastestThenEpThenDp) {
  const MeshSizes s{2, 2, 3};  // dp 2, cp 2, ep 3: 12 ranks
  EXPECT_EQ(mesh_rank({0, 1, 0}, s), 1);  // cp neighbours are adjacent ranks
  EXPECT_EQ(mesh_rank({0, 0, 1}, s), 2);  // next ep: one cp group further
  EXPECT_EQ(mesh_rank({1, 0, 0}, s), 6);  // next dp: one cp x ep block further
  EXPECT_EQ(mesh_rank({1, 1, 2}, s), 11);
  for (int rank = 0; rank < 12; ++rank) {
    MeshCoord c = mesh_coord(rank, s);
    EXPECT_EQ(mesh_rank(c, s), rank);
    EXPECT_EQ(rank, (c.dp * s.ep + c.ep) * s.cp + c.cp);
  }
}

// World ranks of the members of `group`, in group-rank order.
std::vector<int64_t> members(Communicator& group, int world_rank) {
  Tensor mine = Tensor::scalar(world_rank, DType::i64);
  Tensor all = Tensor::zeros({group.size()}, DType::i64);
  group.all_gather(all, mine, cpu_stream());
  return all.to_vector<int64_t>();
}

void check_mesh(const MeshSizes& requested) {
  MpiCommunicator& world = testing::mpi_context().world();
  DeviceMesh mesh(requested, world);
  const MeshSizes& s = mesh.sizes();
  const MeshCoord& c = mesh.coord();
  const std::string where = "dp=" + std::to_string(s.dp) + " cp=" + std::to_string(s.cp) + " ep=" + std::to_string(s.ep);
  EXPECT_EQ(mesh.world_size(), world.size()) << where;
  EXPECT_EQ(mesh.world_rank(), world.rank()) << where;
  EXPECT_EQ(mesh_rank(c, s), world.rank()) << where;

  struct Expect {
    std::string name;
    int size;
    int rank;
    std::vector<int64_t> members;
  };
  std::vector<Expect> expects;
  auto collect = [&](const std::string& name, bool dp, bool cp, bool ep) {
    Expect e{name, (dp ? s.dp : 1) * (cp ? s.cp : 1) * (ep ? s.ep : 1), 0, {}};
    // Members: vary the axes of the group, others fixed; world order.
    for (int d = 0; d < s.dp; ++d)
      for (int x = 0; x < s.ep; ++x)
        for (int q = 0; q < s.cp; ++q) {
          if ((!dp && d != c.dp) || (!ep && x != c.ep) || (!cp && q != c.cp)) continue;
          e.members.push_back(mesh_rank({d, q, x}, s));
        }
    for (size_t i = 0; i < e.members.size(); ++i)
      if (e.members[i] == world.rank()) e.rank = static_cast<int>(i);
    expects.push_back(e);
  };
  collect("world", true, true, true);
  collect("dp", true, false, false);
  collect("cp", false, true, false);
  collect("ep", false, false, true);
  collect("dp_cp", true, true, false);
  collect("dp_ep", true, false, true);
  collect("cp_ep", false, true, true);
  for (const Expect& e : expects) {
    Communicator& g = mesh.group(e.name);
    EXPECT_EQ(g.name(), e.name);
    EXPECT_EQ(g.size(), e.size) << e.name << " with " << where;
    EXPECT_EQ(g.rank(), e.rank) << e.name << " with " << where;
    EXPECT_EQ(members(g, world.rank()), e.members) << e.name << " with " << where;
  }
  EXPECT_EQ(mesh.group("dp").rank(), c.dp);
  EXPECT_EQ(mesh.group("cp").rank(), c.cp);
  EXPECT_EQ(mesh.group("ep").rank(), c.ep);
  EXPECT_EQ(mesh.group("dp_cp").rank(), c.dp * s.cp + c.cp);
}

TEST(DeviceMesh, GroupsForEveryFactorizationOfTheWorld) {
  const int world = testing::mpi_context().world_size();
  for (int cp = 1; cp <= world; ++cp)
    for (int ep = 1; ep <= world; ++ep) {
      if (world % (cp * ep) != 0) continue;
      check_mesh({world / (cp * ep), cp, ep});
      check_mesh({0, cp, ep});  // dp from the world size
    }
}

TEST(DeviceMesh, BadSizesAndUnknownGroupsAreErrors) {
  MpiCommunicator& world = testing::mpi_context().world();
  const int p = world.size();
  std::string msg = error_message([&] { DeviceMesh mesh({p + 1, 1, 1}, world); });
  EXPECT_TRUE(contains(msg, "dp=" + std::to_string(p + 1) + " cp=1 ep=1") &&
              contains(msg, "world=" + std::to_string(p)))
      << msg;
  DeviceMesh mesh({0, 1, 1}, world);
  msg = error_message([&] { mesh.group("tp"); });
  EXPECT_TRUE(contains(msg, "'tp'") && contains(msg, "world, dp, cp, ep, dp_cp, dp_ep, cp_ep")) << msg;
}

}  // namespace
}  // namespace loom
