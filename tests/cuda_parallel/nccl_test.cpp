// NcclCommunicator and the CUDA mesh under mpirun (world size 1..N, one GPU
// per rank): every collective on CUDA tensors equals the MpiCommunicator's
// result on the same CPU tensors (the oracle, itself tested against hand
// values in tests/parallel), in f32, bf16 and i64; async all-reduce ordering;
// the mesh routing CUDA tensors to NCCL and CPU tensors to MPI; and data
// parallelism on GPUs: N ranks' averaged gradients equal one rank's gradient
// of the whole batch. Skips (on every rank alike) without a GPU per rank.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "framework/ops.h"
#include "framework/storage.h"
#include "parallel/cuda/nccl_communicator.h"
#include "parallel/data_parallel.h"
#include "parallel/mesh.h"
#include "parallel/mpi_communicator.h"
#include "tests/cuda_parallel/cuda_parallel_testing.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::cpu_stream;
using testing::my_gpu;
using testing::world;

// Rank r's values (exact in bf16: small halves).
Tensor rank_values(const Shape& shape, int r, DType dtype) {
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(static_cast<int64_t>(i) % 7) - 3.0 + 0.5 * r;
  return Tensor::from_vector(v, shape).to(dtype);
}

::testing::AssertionResult equal_on_host(const Tensor& gpu, const Tensor& cpu, double rtol = 0) {
  return testing::tensors_close(gpu.to(Device::cpu()).to(DType::f64), cpu.to(DType::f64), rtol, 0);
}

struct Fixture {
  Device gpu = my_gpu();
  NcclCommunicator nccl{world(), gpu};
  Stream& stream = Stream::default_for(gpu);
};

TEST(Nccl, AllReduceEqualsMpiForEveryOpAndDtype) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("NCCL test");
  Fixture f;
  EXPECT_EQ(f.nccl.rank(), world().rank());
  EXPECT_EQ(f.nccl.size(), world().size());
  for (DType dtype : {DType::f32, DType::bf16, DType::i64}) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max, ReduceOp::min}) {
      if (dtype == DType::i64 && op == ReduceOp::avg) continue;  // integer average is not defined
      if (dtype == DType::bf16 && op == ReduceOp::avg && world().size() == 3) continue;  // 1/3 is inexact in bf16
      SCOPED_TRACE(::testing::Message() << dtype << " " << reduce_op_name(op));
      Tensor host = rank_values({3, 17}, world().rank(), dtype == DType::bf16 ? DType::f32 : dtype);
      Tensor dev = rank_values({3, 17}, world().rank(), dtype).to(f.gpu);
      world().all_reduce(host, op, cpu_stream());
      f.nccl.all_reduce(dev, op, f.stream);
      // An average may divide before or after summing (NCCL premultiplies): one rounding apart.
      EXPECT_TRUE(equal_on_host(dev, host, op == ReduceOp::avg ? 1e-6 : 0));
    }
  }
}

TEST(Nccl, GatherScatterBroadcastEqualMpi) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("NCCL test");
  Fixture f;
  const int p = world().size(), r = world().rank();
  Tensor in = rank_values({5, 3}, r, DType::f32);
  Tensor out_host = Tensor::empty({5 * p, 3}), out_dev = Tensor::full({5 * p, 3}, NAN, DType::f32, f.gpu);
  world().all_gather(out_host, in, cpu_stream());
  f.nccl.all_gather(out_dev, in.to(f.gpu), f.stream);
  EXPECT_TRUE(equal_on_host(out_dev, out_host));

  Tensor big = rank_values({3 * p, 4}, r, DType::f32);
  Tensor rs_host = Tensor::empty({3, 4}), rs_dev = Tensor::full({3, 4}, NAN, DType::f32, f.gpu);
  world().reduce_scatter(rs_host, big, ReduceOp::sum, cpu_stream());
  f.nccl.reduce_scatter(rs_dev, big.to(f.gpu), ReduceOp::sum, f.stream);
  EXPECT_TRUE(equal_on_host(rs_dev, rs_host));

  Tensor b_host = rank_values({17}, r, DType::f32), b_dev = b_host.to(f.gpu);
  int root = p - 1;
  world().broadcast(b_host, root, cpu_stream());
  f.nccl.broadcast(b_dev, root, f.stream);
  EXPECT_TRUE(equal_on_host(b_dev, b_host));
}

TEST(Nccl, PointToPointAndAllToAllEqualMpi) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("NCCL test");
  Fixture f;
  const int p = world().size(), r = world().rank();
  // Ring step: send to r + 1, receive from r - 1.
  Tensor send = rank_values({2, 65}, r, DType::bf16);
  Tensor recv_dev = Tensor::full({2, 65}, NAN, DType::bf16, f.gpu);
  f.nccl.send_recv(send.to(f.gpu), (r + 1) % p, recv_dev, (r - 1 + p) % p, f.stream);
  EXPECT_TRUE(equal_on_host(recv_dev, rank_values({2, 65}, (r - 1 + p) % p, DType::bf16)));

  Tensor in = rank_values({2 * p, 3}, r, DType::f32);
  Tensor a2a_host = Tensor::empty({2 * p, 3}), a2a_dev = Tensor::full({2 * p, 3}, NAN, DType::f32, f.gpu);
  world().all_to_all(a2a_host, in, cpu_stream());
  f.nccl.all_to_all(a2a_dev, in.to(f.gpu), f.stream);
  EXPECT_TRUE(equal_on_host(a2a_dev, a2a_host));

  // Uneven rows: rank r sends (r + d) % 3 rows to rank d (zero rows included).
  std::vector<int64_t> in_splits(p), out_splits(p);
  for (int d = 0; d < p; ++d) in_splits[d] = (r + d) % 3;
  for (int s = 0; s < p; ++s) out_splits[s] = (s + r) % 3;
  int64_t n_in = std::accumulate(in_splits.begin(), in_splits.end(), int64_t{0});
  int64_t n_out = std::accumulate(out_splits.begin(), out_splits.end(), int64_t{0});
  Tensor v_in = rank_values({n_in, 5}, r, DType::f32);
  Tensor v_host = Tensor::empty({n_out, 5}), v_dev = Tensor::full({n_out, 5}, NAN, DType::f32, f.gpu);
  world().all_to_all_v(v_host, out_splits, v_in, in_splits, cpu_stream());
  f.nccl.all_to_all_v(v_dev, out_splits, v_in.to(f.gpu), in_splits, f.stream);
  EXPECT_TRUE(equal_on_host(v_dev, v_host));
}

TEST(Nccl, AsyncAllReduceIsOrderedOnTheCallersStream) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("NCCL test");
  Fixture f;
  Tensor host = rank_values({1 << 16}, world().rank(), DType::f32);
  Tensor dev = host.to(f.gpu);
  std::unique_ptr<Work> work = f.nccl.all_reduce_async(dev, ReduceOp::sum, f.stream);
  work->wait();  // orders f.stream after the reduction (no host wait)
  Tensor copy = dev.clone();  // queued on f.stream after wait(): must see the reduced values
  world().all_reduce(host, ReduceOp::sum, cpu_stream());
  EXPECT_TRUE(equal_on_host(copy, host));
  EXPECT_TRUE(work->is_completed());  // the copy back to the host above waited for the stream
}

TEST(Nccl, CudaMeshRoutesCudaTensorsToNcclAndCpuTensorsToMpi) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("NCCL test");
  Device gpu = my_gpu();
  DeviceMesh mesh(MeshSizes{}, world(), gpu);
  EXPECT_EQ(mesh.device(), gpu);
  Communicator& dp = mesh.group("dp");
  Tensor host = rank_values({4}, world().rank(), DType::f64), dev = host.to(gpu);
  dp.all_reduce(host, ReduceOp::avg, cpu_stream());
  dp.all_reduce(dev, ReduceOp::avg, Stream::default_for(gpu));
  EXPECT_EQ(host.device(), Device::cpu());
  EXPECT_TRUE(equal_on_host(dev, host));
}

TEST(Nccl, DataParallelGradientsOnGpusEqualOneRankOnTheWholeBatch) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("NCCL test");
  Device gpu = my_gpu();
  DeviceMesh mesh(MeshSizes{}, world(), gpu);
  const int p = world().size(), r = world().rank();
  // Every rank knows every rank's batch (seeded by rank); the reference is the
  // gradient of the mean loss over the whole batch, computed on the host.
  auto batch = [](int rank) { return testing::random_tensor({3, 9}, 200 + rank, DType::f32); };
  Tensor w0 = testing::random_tensor({5, 9}, 199, DType::f32);
  Tensor g_out = testing::random_tensor({3, 5}, 198, DType::f32);

  Variable w(w0.to(gpu), true);
  std::vector<Parameter> params{{"w", w, {}}};
  GradReducer reducer(params, mesh.group("dp"));
  linear(Variable(batch(r).to(gpu)), w).backward(g_out.to(gpu));
  reducer.finish();

  Variable w_ref(w0, true);  // on the host: the whole batch's gradient, summed over the ranks' parts
  for (int q = 0; q < p; ++q) linear(Variable(batch(q)), w_ref).backward(g_out);
  Tensor expected = w_ref.grad();
  Tensor mean = Tensor::empty(expected.shape());
  for (int64_t i = 0; i < expected.numel(); ++i) mean.data<float>()[i] = expected.data<float>()[i] / p;
  EXPECT_TRUE(testing::tensors_close(w.grad().to(Device::cpu()), mean, 1e-5, 1e-6));
}

}  // namespace
}  // namespace loom
