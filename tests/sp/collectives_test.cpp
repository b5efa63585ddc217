// Differentiable collectives (parallel/sp_collectives.h): on P ranks, outputs
// and input gradients equal the 1-rank equivalent, the same computation
// written with local ops over all ranks' data (every rank rebuilds all inputs
// from their seeds, runs it, and compares its own part). Objective: the sum
// over ranks of <y_r, w_r> (the sum-of-shares convention), or, for
// reduce_from_group, one replicated <y, w>.
#include <gtest/gtest.h>

#include "framework/ops.h"
#include "parallel/sp_collectives.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using RefFn = std::function<std::vector<Variable>(const std::vector<Variable>& all_inputs)>;  // -> y per rank
using DistFn = std::function<Variable(const Variable& x, Communicator& comm)>;

struct Case {
  Shape shape;
  bool same_input = false;   // a replicated input (copy_to_group)
  bool same_weight = false;  // a replicated objective (reduce_from_group: counted once)
};

void check_collective(const Case& c, const DistFn& dist, const RefFn& ref) {
  Communicator& comm = testing::mpi_context().world();
  const int p = comm.size(), me = comm.rank();
  auto input = [&](int r) { return testing::random_tensor(c.shape, c.same_input ? 11 : 100 + r); };
  auto weight = [&](int r, const Shape& s) { return testing::random_tensor(s, c.same_weight ? 21 : 200 + r); };

  Variable x(input(me), true);
  Variable y = dist(x, comm);
  sum(mul(y, Variable(weight(me, y.shape())))).backward();

  std::vector<Variable> xs;
  for (int r = 0; r < p; ++r) xs.emplace_back(input(r), true);
  std::vector<Variable> ys = ref(xs);
  ASSERT_EQ(static_cast<int>(ys.size()), p);
  Variable total;
  for (int r = 0; r < (c.same_weight ? 1 : p); ++r) {
    Variable term = sum(mul(ys[r], Variable(weight(r, ys[r].shape()))));
    total = total.defined() ? add(total, term) : term;
  }
  total.backward();
  EXPECT_TENSOR_CLOSE(y.data(), ys[me].data(), 1e-12, 1e-12);
  // An input that reaches no output (broadcast off the root) gets no reference gradient: zeros.
  Tensor expected = xs[me].grad().defined() ? xs[me].grad() : Tensor::zeros(c.shape, DType::f64);
  if (c.same_input) {  // one replicated leaf: its gradient is the sum over the copies
    expected = xs[0].grad().clone();
    for (int r = 1; r < p; ++r) expected = add(Variable(expected), Variable(xs[r].grad())).data();
  }
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TENSOR_CLOSE(x.grad(), expected, 1e-12, 1e-12);
}

Variable sum_of(const std::vector<Variable>& xs) {
  Variable s = xs[0];
  for (size_t i = 1; i < xs.size(); ++i) s = add(s, xs[i]);
  return s;
}

int world_size() { return testing::mpi_context().world().size(); }

TEST(SpCollectives, AllGatherAlongEachDimEqualsConcat) {
  const int p = world_size();
  for (int64_t dim : {0, 1, 2}) {
    check_collective({{3, 2, 5}}, [dim](const Variable& x, Communicator& c) { return sp::all_gather(x, c, dim); },
                     [dim, p](const std::vector<Variable>& xs) {
                       return std::vector<Variable>(static_cast<size_t>(p), concat(xs, dim));
                     });
  }
}

TEST(SpCollectives, ReduceScatterEqualsSumThenSlice) {
  const int p = world_size();
  for (int64_t dim : {0, 1}) {
    Shape shape{3, 5};
    shape[static_cast<size_t>(dim)] = 2 * p;
    check_collective({shape}, [dim](const Variable& x, Communicator& c) { return sp::reduce_scatter(x, c, dim); },
                     [dim, p](const std::vector<Variable>& xs) {
                       Variable s = sum_of(xs);
                       std::vector<Variable> ys;
                       for (int r = 0; r < p; ++r) ys.push_back(narrow(s, dim, 2 * r, 2));
                       return ys;
                     });
  }
}

TEST(SpCollectives, AllToAllEqualsBlockTranspose) {
  const int p = world_size();
  for (auto [split, cat] : std::vector<std::pair<int64_t, int64_t>>{{1, 2}, {2, 0}, {1, 1}}) {
    Shape shape{3, 2 * p, 3 * p};
    check_collective(
        {shape}, [split, cat](const Variable& x, Communicator& c) { return sp::all_to_all(x, c, split, cat); },
        [split, cat, p, shape](const std::vector<Variable>& xs) {
          const int64_t piece = shape[static_cast<size_t>(split)] / p;
          std::vector<Variable> ys;
          for (int r = 0; r < p; ++r) {
            std::vector<Variable> blocks;
            for (int src = 0; src < p; ++src) blocks.push_back(narrow(xs[src], split, r * piece, piece));
            ys.push_back(concat(blocks, cat));
          }
          return ys;
        });
  }
}

TEST(SpCollectives, BroadcastAndReduceAreConjugate) {
  const int p = world_size();
  const int root = p - 1;
  check_collective({{4, 3}}, [root](const Variable& x, Communicator& c) { return sp::broadcast(x, c, root); },
                   [root, p](const std::vector<Variable>& xs) {
                     return std::vector<Variable>(static_cast<size_t>(p), xs[root]);
                   });
  check_collective({{4, 3}}, [root](const Variable& x, Communicator& c) { return sp::reduce(x, c, root); },
                   [root, p](const std::vector<Variable>& xs) {
                     std::vector<Variable> ys;
                     for (int r = 0; r < p; ++r) ys.push_back(r == root ? sum_of(xs) : scale(xs[0], 0.0));
                     return ys;
                   });
}

TEST(SpCollectives, CopyToGroupAndReduceFromGroup) {
  const int p = world_size();
  // A replicated value used by every rank's share: its gradient is the sum of the shares' gradients.
  check_collective({{2, 7}, /*same_input=*/true}, [](const Variable& x, Communicator& c) { return sp::copy_to_group(x, c); },
                   [](const std::vector<Variable>& xs) { return xs; });
  // Partial sums reduced into one replicated value, consumed once.
  check_collective({{2, 7}, false, /*same_weight=*/true},
                   [](const Variable& x, Communicator& c) { return sp::reduce_from_group(x, c); },
                   [p](const std::vector<Variable>& xs) {
                     return std::vector<Variable>(static_cast<size_t>(p), sum_of(xs));
                   });
  // A global statistic used in every rank's share.
  check_collective({{3}}, [](const Variable& x, Communicator& c) { return sp::all_reduce_sum(x, c); },
                   [p](const std::vector<Variable>& xs) {
                     return std::vector<Variable>(static_cast<size_t>(p), sum_of(xs));
                   });
}

TEST(SpCollectives, BadArgumentsAreErrors) {
  Communicator& comm = testing::mpi_context().world();
  const int p = comm.size();
  Variable x(testing::random_tensor({2 * p + 1, 3}, 1), true);
  if (p > 1) {
    std::string msg = testing::error_message([&] { sp::reduce_scatter(x, comm, 0); });
    EXPECT_NE(msg.find("not a multiple of the group size"), std::string::npos) << msg;
  }
  std::string msg = testing::error_message([&] { sp::broadcast(x, comm, p); });
  EXPECT_NE(msg.find("root " + std::to_string(p)), std::string::npos) << msg;
}

}  // namespace
}  // namespace loom
