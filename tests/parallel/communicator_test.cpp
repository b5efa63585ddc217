// MpiCommunicator against values computed by hand for the actual group size
// (1, 2 or 3 ranks under ctest): every collective, every reduction and dtype
// it supports, odd shapes, and the errors for bad arguments. Also MpiContext.
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include "parallel/mpi_communicator.h"
#include "tests/parallel/parallel_testing.h"

namespace loom {
namespace {

using testing::cpu_stream;
using testing::error_message;

MpiCommunicator& world() { return testing::mpi_context().world(); }

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Rank r's value at element i (exact in every dtype tested: small halves and integers).
double value(int r, int64_t i) { return static_cast<double>(i % 7) - 3.0 + 0.5 * r; }
int64_t int_value(int r, int64_t i) { return i - 2 * r; }

template <typename T>
Tensor rank_tensor(const Shape& shape, int r) {
  std::vector<T> v(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_floating_point_v<T>) {
      v[i] = static_cast<T>(value(r, static_cast<int64_t>(i)));
    } else {
      v[i] = static_cast<T>(int_value(r, static_cast<int64_t>(i)));
    }
  }
  return Tensor::from_vector<T>(v, shape);
}

template <typename T>
std::vector<T> expected_reduction(const Shape& shape, int p, ReduceOp op) {
  std::vector<T> out(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < out.size(); ++i) {
    T acc{};
    for (int r = 0; r < p; ++r) {
      T v = rank_tensor<T>(shape, r).template to_vector<T>()[i];
      if (r == 0) acc = v;
      else if (op == ReduceOp::max) acc = std::max(acc, v);
      else if (op == ReduceOp::min) acc = std::min(acc, v);
      else acc += v;
    }
    if (op == ReduceOp::avg) acc /= static_cast<T>(p);
    out[i] = acc;
  }
  return out;
}

template <typename T>
void check_all_reduce(ReduceOp op) {
  MpiCommunicator& comm = world();
  const Shape shape{3, 5};  // odd sizes
  Tensor t = rank_tensor<T>(shape, comm.rank());
  comm.all_reduce(t, op, cpu_stream());
  EXPECT_EQ(t.to_vector<T>(), expected_reduction<T>(shape, comm.size(), op))
      << reduce_op_name(op) << " " << t.dtype() << " over " << comm.size() << " ranks";
}

TEST(MpiCommunicator, AllReduceEveryOpAndDtype) {
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max, ReduceOp::min}) {
    check_all_reduce<float>(op);
    check_all_reduce<double>(op);
    if (op == ReduceOp::avg) continue;
    check_all_reduce<int64_t>(op);
    check_all_reduce<int32_t>(op);
  }
}

TEST(MpiCommunicator, AllReduceRejectsWhatItCannotReduce) {
  Tensor h = Tensor::zeros({4}, DType::bf16);
  std::string msg = error_message([&] { world().all_reduce(h, ReduceOp::sum, cpu_stream()); });
  EXPECT_TRUE(contains(msg, "bf16") && contains(msg, "not supported")) << msg;
  Tensor i = Tensor::zeros({4}, DType::i64);
  msg = error_message([&] { world().all_reduce(i, ReduceOp::avg, cpu_stream()); });
  EXPECT_TRUE(contains(msg, "avg needs a floating dtype") && contains(msg, "i64")) << msg;
  Tensor nc = Tensor::zeros({3, 4}).transpose(0, 1);
  msg = error_message([&] { world().all_reduce(nc, ReduceOp::sum, cpu_stream()); });
  EXPECT_TRUE(contains(msg, "not contiguous") && contains(msg, "(4, 3)") && contains(msg, "world")) << msg;
  Tensor undefined;
  EXPECT_TRUE(contains(error_message([&] { world().all_reduce(undefined, ReduceOp::sum, cpu_stream()); }),
                       "undefined"));
}

TEST(MpiCommunicator, AllReduceOfAnEmptyTensor) {
  Tensor t = Tensor::zeros({0, 3});
  world().all_reduce(t, ReduceOp::sum, cpu_stream());
  EXPECT_EQ(t.numel(), 0);
}

TEST(MpiCommunicator, AsyncAllReduceCompletesOutOfOrder) {
  MpiCommunicator& comm = world();
  Tensor a = rank_tensor<float>({5}, comm.rank());
  Tensor b = rank_tensor<double>({2, 3}, comm.rank());
  std::unique_ptr<Work> wa = comm.all_reduce_async(a, ReduceOp::avg, cpu_stream());
  std::unique_ptr<Work> wb = comm.all_reduce_async(b, ReduceOp::max, cpu_stream());
  wb->wait();
  while (!wa->is_completed()) {
  }
  wa->wait();  // again: a no-op
  EXPECT_TRUE(wb->is_completed());
  EXPECT_EQ(a.to_vector<float>(), expected_reduction<float>({5}, comm.size(), ReduceOp::avg));
  EXPECT_EQ(b.to_vector<double>(), expected_reduction<double>({2, 3}, comm.size(), ReduceOp::max));
  // A Work dropped without wait() waits in its destructor.
  Tensor c = rank_tensor<float>({3}, comm.rank());
  comm.all_reduce_async(c, ReduceOp::sum, cpu_stream()).reset();
  EXPECT_EQ(c.to_vector<float>(), expected_reduction<float>({3}, comm.size(), ReduceOp::sum));
}

TEST(MpiCommunicator, AllGatherConcatenatesInRankOrder) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  Tensor in = rank_tensor<float>({2, 3}, r);  // (N, 3)
  Tensor out = Tensor::full({2 * p, 3}, -99.0);  // (P * N, 3)
  comm.all_gather(out, in, cpu_stream());
  std::vector<float> expected;
  for (int q = 0; q < p; ++q) {
    std::vector<float> block = rank_tensor<float>({2, 3}, q).to_vector<float>();
    expected.insert(expected.end(), block.begin(), block.end());
  }
  EXPECT_EQ(out.to_vector<float>(), expected);

  // A scalar per rank gathers into (P); 16-bit floats travel as raw bits.
  Tensor s = Tensor::scalar(10.0 * r + 1, DType::i64);
  Tensor gathered = Tensor::zeros({p}, DType::i64);
  comm.all_gather(gathered, s, cpu_stream());
  for (int q = 0; q < p; ++q) EXPECT_EQ(gathered.to_vector<int64_t>()[q], 10 * q + 1);
  Tensor h = Tensor::full({3}, 0.25 + r, DType::bf16);
  Tensor hs = Tensor::zeros({3 * p}, DType::bf16);
  comm.all_gather(hs, h, cpu_stream());
  for (int q = 0; q < p; ++q) EXPECT_EQ(hs.to_vector<float>()[3 * q + 2], 0.25f + q);
}

TEST(MpiCommunicator, AllGatherShapeErrorsNameTheShapes) {
  MpiCommunicator& comm = world();
  const int p = comm.size();
  Tensor in = Tensor::zeros({2, 3});
  Tensor wrong = Tensor::zeros({2 * p + 1, 3});
  std::string msg = error_message([&] { comm.all_gather(wrong, in, cpu_stream()); });
  const std::string want = shape_str({2 * p, 3});
  EXPECT_TRUE(contains(msg, shape_str(wrong.shape())) && contains(msg, want) && contains(msg, "(2, 3)") &&
              contains(msg, "P = " + std::to_string(p)))
      << msg;
  Tensor other_dtype = Tensor::zeros({2 * p, 3}, DType::f64);
  msg = error_message([&] { comm.all_gather(other_dtype, in, cpu_stream()); });
  EXPECT_TRUE(contains(msg, "dtypes differ")) << msg;
}

TEST(MpiCommunicator, ReduceScatterGivesEachRankItsBlock) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max}) {
    Tensor in = rank_tensor<double>({2 * p, 3}, r);  // (P * N, 3)
    Tensor out = Tensor::zeros({2, 3}, DType::f64);  // (N, 3)
    comm.reduce_scatter(out, in, op, cpu_stream());
    std::vector<double> full = expected_reduction<double>({2 * p, 3}, p, op);
    std::vector<double> mine(full.begin() + 6 * r, full.begin() + 6 * (r + 1));
    EXPECT_EQ(out.to_vector<double>(), mine) << reduce_op_name(op);
  }
  Tensor in = Tensor::zeros({2 * p + 1, 3});
  Tensor out = Tensor::zeros({2, 3});
  std::string msg = error_message([&] { comm.reduce_scatter(out, in, ReduceOp::sum, cpu_stream()); });
  EXPECT_TRUE(contains(msg, "reduce_scatter") && contains(msg, shape_str(in.shape()))) << msg;
}

TEST(MpiCommunicator, BroadcastFromEveryRoot) {
  MpiCommunicator& comm = world();
  for (int root = 0; root < comm.size(); ++root) {
    Tensor t = rank_tensor<int32_t>({7}, comm.rank());
    comm.broadcast(t, root, cpu_stream());
    EXPECT_EQ(t.to_vector<int32_t>(), rank_tensor<int32_t>({7}, root).to_vector<int32_t>()) << "root " << root;
    Tensor h = Tensor::full({2, 2}, 1.5 * comm.rank(), DType::f16);
    comm.broadcast(h, root, cpu_stream());
    EXPECT_EQ(h.to_vector<float>(), std::vector<float>(4, 1.5f * root));
  }
  Tensor t = Tensor::zeros({2});
  std::string msg = error_message([&] { comm.broadcast(t, comm.size(), cpu_stream()); });
  EXPECT_TRUE(contains(msg, "root rank " + std::to_string(comm.size())) && contains(msg, "is not in [0, ")) << msg;
}

TEST(MpiCommunicator, SendRecvRingStep) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const int next = (r + 1) % p, prev = (r - 1 + p) % p;
  Tensor mine = rank_tensor<float>({3, 5}, r);
  Tensor got = Tensor::zeros({3, 5});
  comm.send_recv(mine, next, got, prev, cpu_stream());
  EXPECT_EQ(got.to_vector<float>(), rank_tensor<float>({3, 5}, prev).to_vector<float>());
  // A whole turn around the ring brings every block home.
  Tensor travelling = mine.clone();
  for (int step = 0; step < p; ++step) {
    Tensor incoming = Tensor::zeros({3, 5});
    comm.send_recv(travelling, next, incoming, prev, cpu_stream());
    travelling = incoming;
  }
  EXPECT_EQ(travelling.to_vector<float>(), mine.to_vector<float>());
}

TEST(MpiCommunicator, SendRecvPairsAndSizeMismatch) {
  MpiCommunicator& comm = world();
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int r = comm.rank();
  // Pairs (0, 1), (2, 3), ...; a last unpaired rank (odd P) sits out.
  const bool sender = r % 2 == 0 && r + 1 < comm.size();
  const bool receiver = r % 2 == 1;
  if (sender) comm.send(rank_tensor<int64_t>({2, 3}, r), r + 1, cpu_stream());
  if (receiver) {
    Tensor t = Tensor::zeros({2, 3}, DType::i64);
    comm.recv(t, r - 1, cpu_stream());
    EXPECT_EQ(t.to_vector<int64_t>(), rank_tensor<int64_t>({2, 3}, r - 1).to_vector<int64_t>());
  }
  // Shorter than expected: the receiver says how much came.
  if (sender) comm.send(Tensor::zeros({4}), r + 1, cpu_stream());
  if (receiver) {
    Tensor t = Tensor::zeros({6});
    std::string msg = error_message([&] { comm.recv(t, r - 1, cpu_stream()); });
    EXPECT_TRUE(contains(msg, "received 4 elements from rank " + std::to_string(r - 1)) && contains(msg, "(6,) f32 tensor expects 6"))
        << msg;
  }
  // Longer than expected: MPI's truncation error, with what the call was.
  if (sender) comm.send(Tensor::zeros({8}), r + 1, cpu_stream());
  if (receiver) {
    Tensor t = Tensor::zeros({6});
    std::string msg = error_message([&] { comm.recv(t, r - 1, cpu_stream()); });
    EXPECT_TRUE(contains(msg, "recv of (6,) f32 from rank")) << msg;
  }
  Tensor t = Tensor::zeros({1});
  EXPECT_TRUE(contains(error_message([&] { comm.send(t, -1, cpu_stream()); }), "destination rank -1"));
  comm.barrier();
}

TEST(MpiCommunicator, AllToAllExchangesBlocks) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  // Block j of rank r's input holds r * 1000 + j * 10 + k (k within the block).
  Tensor in = Tensor::empty({2 * p, 3}, DType::i32);  // (P * 2, 3)
  for (int j = 0; j < p; ++j)
    for (int k = 0; k < 6; ++k) in.data<int32_t>()[j * 6 + k] = r * 1000 + j * 10 + k;
  Tensor out = Tensor::zeros({2 * p, 3}, DType::i32);
  comm.all_to_all(out, in, cpu_stream());
  for (int j = 0; j < p; ++j)
    for (int k = 0; k < 6; ++k) EXPECT_EQ(out.to_vector<int32_t>()[j * 6 + k], j * 1000 + r * 10 + k);
  if (p > 1) {
    Tensor odd = Tensor::zeros({2 * p + 1, 3}, DType::i32);
    std::string msg = error_message([&] { comm.all_to_all(odd, odd, cpu_stream()); });
    EXPECT_TRUE(contains(msg, "multiple of P = " + std::to_string(p))) << msg;
  }
  Tensor other = Tensor::zeros({2 * p, 4}, DType::i32);
  EXPECT_TRUE(contains(error_message([&] { comm.all_to_all(other, in, cpu_stream()); }), "must have the shape"));
}

// Rank r sends (r + 2 j) % 3 rows to rank j, so it receives (j + 2 r) % 3 from rank j
// (counts of 0 included); row k of the block r -> j holds r * 1000 + j * 10 + k, twice.
void check_all_to_all_v(Communicator& comm, bool base_implementation) {
  const int p = comm.size(), r = comm.rank();
  std::vector<int64_t> in_splits(p), out_splits(p);
  for (int j = 0; j < p; ++j) {
    in_splits[j] = (r + 2 * j) % 3;
    out_splits[j] = (j + 2 * r) % 3;
  }
  const int64_t in_rows = std::accumulate(in_splits.begin(), in_splits.end(), int64_t{0});
  const int64_t out_rows = std::accumulate(out_splits.begin(), out_splits.end(), int64_t{0});
  Tensor in = Tensor::empty({in_rows, 2}, DType::f32);  // (sum in_splits, 2)
  int64_t row = 0;
  for (int j = 0; j < p; ++j)
    for (int64_t k = 0; k < in_splits[j]; ++k, ++row)
      for (int c = 0; c < 2; ++c) in.data<float>()[row * 2 + c] = static_cast<float>(r * 1000 + j * 10 + k);
  Tensor out = Tensor::full({out_rows, 2}, -1.0);  // (sum out_splits, 2)
  if (base_implementation) {
    comm.Communicator::all_to_all_v(out, out_splits, in, in_splits, cpu_stream());
  } else {
    comm.all_to_all_v(out, out_splits, in, in_splits, cpu_stream());
  }
  std::vector<float> got = out.to_vector<float>();
  row = 0;
  for (int j = 0; j < p; ++j)
    for (int64_t k = 0; k < out_splits[j]; ++k, ++row)
      for (int c = 0; c < 2; ++c)
        EXPECT_EQ(got[row * 2 + c], static_cast<float>(j * 1000 + r * 10 + k))
            << "row " << row << " from rank " << j << (base_implementation ? " (send_recv rounds)" : "");
}

TEST(MpiCommunicator, AllToAllWithPerRankCounts) {
  check_all_to_all_v(world(), false);
  check_all_to_all_v(world(), true);
  Tensor in = Tensor::zeros({3, 2});
  std::vector<int64_t> bad(world().size(), 0);
  std::string msg = error_message([&] { world().all_to_all_v(in, bad, in, bad, cpu_stream()); });
  EXPECT_TRUE(contains(msg, "in_splits sum to 0") && contains(msg, "3 rows")) << msg;
  std::vector<int64_t> short_list(world().size() + 1, 0);
  msg = error_message([&] { world().all_to_all_v(in, short_list, in, short_list, cpu_stream()); });
  EXPECT_TRUE(contains(msg, std::to_string(world().size() + 1) + " in_splits for")) << msg;
}

TEST(MpiCommunicator, ConsistencyCheckCatchesSizeMismatchOnEveryRank) {
  MpiCommunicator checked(world().comm(), "checked", MpiCommunicatorOptions{true});
  EXPECT_TRUE(checked.check_consistency());
  const int r = checked.rank();
  Tensor same = Tensor::ones({4});
  checked.all_reduce(same, ReduceOp::sum, cpu_stream());  // agreeing ranks pass
  EXPECT_EQ(same.to_vector<float>()[0], static_cast<float>(checked.size()));
  if (checked.size() < 2) return;
  Tensor t = Tensor::ones({r == 0 ? 5 : 4});
  std::string msg = error_message([&] { checked.all_reduce(t, ReduceOp::sum, cpu_stream()); });
  EXPECT_TRUE(contains(msg, "ranks disagree on numel: min 4, max 5") && contains(msg, "'checked'")) << msg;
  // Different collectives on different ranks are caught too.
  msg = error_message([&] {
    if (r == 0) {
      checked.barrier();
    } else {
      Tensor u = Tensor::ones({4});
      checked.broadcast(u, 0, cpu_stream());
    }
  });
  EXPECT_TRUE(contains(msg, "ranks disagree on collective")) << msg;
  // all_to_all_v: this rank expects one row more from rank 0 than rank 0 sends.
  const int p = checked.size();
  std::vector<int64_t> in_splits(p, 1), out_splits(p, 1);
  if (r == 1) out_splits[0] = 2;
  Tensor in = Tensor::zeros({p, 2});
  Tensor out = Tensor::zeros({r == 1 ? p + 1 : p, 2});
  msg = error_message([&] { checked.all_to_all_v(out, out_splits, in, in_splits, cpu_stream()); });
  if (r == 1) {
    EXPECT_TRUE(contains(msg, "rank 0 sends 1 rows to rank 1, which expects 2")) << msg;
  } else {
    EXPECT_TRUE(contains(msg, "the splits of rank 1 disagree")) << msg;
  }
  checked.barrier();  // every rank is back in step
}

TEST(MpiContext, WorldAndLocalRanks) {
  MpiContext& ctx = testing::mpi_context();
  EXPECT_EQ(ctx.world_size(), world().size());
  EXPECT_EQ(ctx.world_rank(), world().rank());
  EXPECT_EQ(world().name(), "world");
  // ctest runs every rank on this one machine.
  EXPECT_EQ(ctx.local_size(), ctx.world_size());
  EXPECT_EQ(ctx.local_rank(), ctx.world_rank());
  // A split gives groups with their own numbering.
  auto halves = world().split(world().rank() % 2, world().rank(), "parity");
  EXPECT_EQ(halves->name(), "parity");
  EXPECT_EQ(halves->size(), (world().size() + 1 - world().rank() % 2) / 2);
  EXPECT_EQ(halves->rank(), world().rank() / 2);
}

}  // namespace
}  // namespace loom
