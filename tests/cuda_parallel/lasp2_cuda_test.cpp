// LASP-2 (parallel/lasp2.h) on GPUs under mpirun, one GPU per rank (local
// rank), cp = the world size, through a CUDA mesh's cp group (NCCL for the
// fp32 states): the local outputs and the gradients of q, k, v equal the
// 1-rank lightning_attention over the whole sequence on the same GPU, for
// both layouts, f32 and bf16, chunks shorter and longer than the kernel's
// 64-token block and not multiples of 8, D = 64 and 40. At np 1 the zigzag
// layout already chains two units through the gathered states and the scan;
// at np 2 the states cross GPUs. Also at any np: cp = 3 and 4 simulated on one
// GPU (a test communicator replays the states the simulated ranks recorded),
// and both checks on the CPU in f64 (they check this test's bookkeeping where
// no GPU is present). The GPU tests skip (on every rank alike) without a GPU
// per rank.
//
// Tolerances: f32 runs fp32 arithmetic in another order (LASP-2 adds the
// inter-unit terms from fp32 GEMMs to the kernel's zero-state pass): 2e-5 at
// the tensor's scale. bf16: both read the same bf16 inputs; LASP-2 rounds the
// zero-state output and the G-free dk, dv to bf16 once more before adding the
// fp32 inter-unit terms, and its GEMMs keep the states fp32 where the kernel's
// tensor cores read them in bf16: a few bf16 ulps (2^-8 relative) apart,
// 2^-6 at the tensor's scale (as the softmax SP tests).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "framework/ops.h"
#include "framework/ops_lightning.h"
#include "parallel/lasp2.h"
#include "parallel/mesh.h"
#include "parallel/mpi_communicator.h"
#include "parallel/token_layout.h"
#include "tests/cuda_parallel/cuda_parallel_testing.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::global_tensor;
using testing::my_gpu;
using testing::world;

struct LaspCase {
  LayoutKind layout = LayoutKind::zigzag;
  DType dtype = DType::f32;
  int64_t B = 2, H = 3, D = 64;
  int64_t chunk = 40;  // tokens per layout chunk
  int64_t block = 64;  // the CPU twin's block size (the CUDA kernel always uses 64)
  double out_scale = 0.125;
};

std::string describe(const LaspCase& c) {
  return std::string(layout_kind_name(c.layout)) + " " + dtype_name(c.dtype) + " chunk " + std::to_string(c.chunk) +
         " D " + std::to_string(c.D);
}

double tolerance(DType dtype) {
  if (dtype == DType::bf16) return std::ldexp(1.0, -6);
  return dtype == DType::f64 ? 1e-11 : 2e-5;
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (double x : t.to_vector<double>()) m = std::max(m, std::fabs(x));
  return m;
}

// A tensor (any device, any dtype) against a reference, on the host in f64,
// relative tolerance `tol` and absolute tol at the reference's scale.
::testing::AssertionResult close(const Tensor& got, const Tensor& want, double tol) {
  Tensor g = got.to(Device::cpu()).to(DType::f64), w = want.to(Device::cpu()).to(DType::f64);
  return testing::tensors_close(g, w, tol, tol * std::max(1.0, max_abs(w)));
}

// The whole sequence of a case split over P ranks (same seeds on every rank,
// seed .. seed + 3 for q, k, v, dout) and lightning_attention's output and
// gradients over it on `device`: what every rank's shard is checked against.
struct OneRankReference {
  TokenLayout layout;
  Tensor lambdas, q, k, v, dout;
  Variable gq, gk, gv, out;
};

OneRankReference one_rank_reference(const LaspCase& c, int P, uint64_t seed, Device device) {
  const int64_t chunks = c.layout == LayoutKind::zigzag ? 2 * P : P;
  const int64_t T = chunks * c.chunk;
  const Shape shape{c.B, T, c.H, c.D};
  // Head 0 has no decay (plain LASP-2), the others decay at different rates.
  Tensor lambdas = Tensor::from_vector(std::vector<double>{0.0, 0.02, 0.3}, {3}).narrow(0, 0, c.H).contiguous();
  Tensor q = global_tensor(shape, seed, c.dtype, device), k = global_tensor(shape, seed + 1, c.dtype, device);
  Tensor v = global_tensor(shape, seed + 2, c.dtype, device), dout = global_tensor(shape, seed + 3, c.dtype, device);
  Variable gq(q, true), gk(k, true), gv(v, true);
  Variable out = lightning_attention(gq, gk, gv, lambdas, Variable(), c.out_scale, c.block).out;
  out.backward(dout);
  return OneRankReference{TokenLayout(c.layout, T, P), lambdas, q, k, v, dout, gq, gk, gv, out};
}

// Rank `rank`'s LASP-2 output and gradients of its shards lq, lk, lv equal
// the reference's shards.
void expect_shard_matches(const OneRankReference& ref, int rank, const Variable& out, const Variable& lq,
                          const Variable& lk, const Variable& lv, double tol) {
  const TokenLayout& layout = ref.layout;
  EXPECT_TRUE(close(out.data(), layout.shard(ref.out.data(), rank, 1), tol)) << "out";
  EXPECT_TRUE(close(lq.grad(), layout.shard(ref.gq.grad(), rank, 1), tol)) << "dq";
  EXPECT_TRUE(close(lk.grad(), layout.shard(ref.gk.grad(), rank, 1), tol)) << "dk";
  EXPECT_TRUE(close(lv.grad(), layout.shard(ref.gv.grad(), rank, 1), tol)) << "dv";
}

// LASP-2 over `cp` on this rank's shard against lightning_attention over the
// whole sequence on the same device.
void expect_lasp2_matches_one_rank(const LaspCase& c, Communicator& cp, Device device) {
  const int P = cp.size(), rank = cp.rank();
  const OneRankReference ref = one_rank_reference(c, P, 31, device);
  const TokenLayout& layout = ref.layout;
  Variable lq(layout.shard(ref.q, rank, 1), true), lk(layout.shard(ref.k, rank, 1), true);
  Variable lv(layout.shard(ref.v, rank, 1), true);
  Variable out = lasp2_attention(lq, lk, lv, ref.lambdas, c.out_scale, c.block, layout, cp);
  EXPECT_EQ(out.dtype(), c.dtype);
  EXPECT_EQ(out.device(), device);
  out.backward(layout.shard(ref.dout, rank, 1));

  SCOPED_TRACE(describe(c) + ", rank " + std::to_string(rank) + " of " + std::to_string(P));
  expect_shard_matches(ref, rank, out, lq, lk, lv, tolerance(c.dtype));
}

std::vector<LaspCase> cases(DType dtype) {
  std::vector<LaspCase> all;
  for (LayoutKind layout : {LayoutKind::zigzag, LayoutKind::contiguous})
    for (int variant = 0; variant < 3; ++variant) {
      LaspCase c;
      c.layout = layout;
      c.dtype = dtype;
      if (variant == 1) c.chunk = 97;  // crosses the kernel's 64-token blocks, not a multiple of 8
      if (variant == 2) {
        c.chunk = 17;
        c.D = 40;
        c.B = 1;
        c.H = 1;
      }
      all.push_back(c);
    }
  return all;
}

TEST(Lasp2Cuda, ThroughTheMeshEqualsOneRank) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("LASP-2 CUDA test");
  const Device gpu = my_gpu();
  DeviceMesh mesh(MeshSizes{0, world().size(), 1}, world(), gpu);
  Communicator& cp = mesh.group("cp");
  for (DType dtype : {DType::f32, DType::bf16})
    for (const LaspCase& c : cases(dtype)) expect_lasp2_matches_one_rank(c, cp, gpu);
}

// The same check on the CPU over MPI, in f64 (any np; runs without a GPU).
TEST(Lasp2Cuda, SameCheckOnTheCpuInF64) {
  for (LaspCase c : cases(DType::f64)) {
    c.block = 16;  // the CPU twin's blocks, with a tail in every case
    c.D = std::min<int64_t>(c.D, 8);  // keeps the f64 CPU kernels quick
    expect_lasp2_matches_one_rank(c, world(), Device::cpu());
  }
}

// One rank of a cp group of `size` simulated on one device: all_gather records
// this rank's input (call 0: the forward states, call 1: the backward state
// gradients) and fills `out` from `gathered` (the inputs every simulated rank
// recorded in an earlier round; zeros in the first round). Every other
// collective is an error (LASP-2 needs none).
class SimulatedRank : public Communicator {
 public:
  SimulatedRank(int rank, int size, std::vector<std::vector<Tensor>>& recorded, bool replay)
      : rank_(rank), size_(size), recorded_(recorded), replay_(replay) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  void all_gather(Tensor& out, const Tensor& in, Stream&) override {
    const size_t call = calls_++;
    if (recorded_.size() <= call) recorded_.resize(call + 1, std::vector<Tensor>(static_cast<size_t>(size_)));
    std::vector<Tensor>& slot = recorded_[call];
    const int64_t n = in.size(0);
    if (!replay_) {
      slot[static_cast<size_t>(rank_)] = in.clone();
      out.copy_(Tensor::zeros(out.shape(), out.dtype(), out.device()));
      return;
    }
    for (int r = 0; r < size_; ++r) out.narrow(0, r * n, n).copy_(slot[static_cast<size_t>(r)]);
  }
  void all_reduce(Tensor&, ReduceOp, Stream&) override { fail("all_reduce"); }
  void reduce_scatter(Tensor&, const Tensor&, ReduceOp, Stream&) override { fail("reduce_scatter"); }
  void broadcast(Tensor&, int, Stream&) override { fail("broadcast"); }
  void send(const Tensor&, int, Stream&) override { fail("send"); }
  void recv(Tensor&, int, Stream&) override { fail("recv"); }
  void send_recv(const Tensor&, int, Tensor&, int, Stream&) override { fail("send_recv"); }
  void all_to_all(Tensor&, const Tensor&, Stream&) override { fail("all_to_all"); }
  void barrier() override { fail("barrier"); }

 private:
  static void fail(const char* what) { LOOM_CHECK(false) << "SimulatedRank: " << what << " is not simulated"; }
  int rank_, size_;
  std::vector<std::vector<Tensor>>& recorded_;
  bool replay_;
  size_t calls_ = 0;
  std::string name_ = "simulated cp";
};

// LASP-2 for each of P simulated ranks on one device equals one-rank
// lightning attention on the whole sequence. Round 1 records every rank's
// gathered inputs (the forward states depend only on the rank's k, v; the
// state gradients only on its q and dout), round 2 replays them as the
// all-gathers' results and is checked. A rank whose states were mixed up, or
// a scan in the wrong order, fails round 2.
void expect_simulated_ranks_match_one_rank(const LaspCase& c, int P, Device device) {
  const OneRankReference ref = one_rank_reference(c, P, 41, device);
  const TokenLayout& layout = ref.layout;
  std::vector<std::vector<Tensor>> recorded;
  for (bool replay : {false, true})
    for (int r = 0; r < P; ++r) {
      SimulatedRank cp(r, P, recorded, replay);
      Variable lq(layout.shard(ref.q, r, 1), true), lk(layout.shard(ref.k, r, 1), true);
      Variable lv(layout.shard(ref.v, r, 1), true);
      Variable out = lasp2_attention(lq, lk, lv, ref.lambdas, c.out_scale, c.block, layout, cp);
      out.backward(layout.shard(ref.dout, r, 1));
      if (!replay) continue;
      SCOPED_TRACE(describe(c) + ", simulated rank " + std::to_string(r) + " of " + std::to_string(P));
      expect_shard_matches(ref, r, out, lq, lk, lv, tolerance(c.dtype));
    }
  ASSERT_EQ(recorded.size(), 2u) << "LASP-2 makes one all-gather forward and one backward";
}

TEST(Lasp2Cuda, SimulatedRanksOnOneGpuEqualOneRank) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("LASP-2 CUDA test");
  const Device gpu = my_gpu();
  for (DType dtype : {DType::f32, DType::bf16})
    for (const LaspCase& c : cases(dtype))
      for (int P : {3, 4}) expect_simulated_ranks_match_one_rank(c, P, gpu);
}

// The same simulation on the CPU in f64 (runs without a GPU).
TEST(Lasp2Cuda, SimulatedRanksOnTheCpuEqualOneRankInF64) {
  for (LaspCase c : cases(DType::f64)) {
    c.block = 16;
    c.D = std::min<int64_t>(c.D, 8);
    for (int P : {3, 4}) expect_simulated_ranks_match_one_rank(c, P, Device::cpu());
  }
}

TEST(Lasp2Cuda, F64OnCudaAndMixedDevicesAreErrors) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("LASP-2 CUDA test");
  const Device gpu = my_gpu();
  const int P = world().size();
  TokenLayout layout(LayoutKind::zigzag, 2 * P * 4, P);
  Tensor lambdas = Tensor::from_vector(std::vector<double>{0.1, 0.2}, {2});
  Tensor q = testing::random_tensor({1, layout.local_len(), 2, 8}, 1, DType::f32);
  Variable qg(q.to(gpu), true), qc(q, true);
  std::string msg = testing::error_message([&] { lasp2_attention(qg, qc, qc, lambdas, 1.0, 64, layout, world()); });
  EXPECT_NE(msg.find("must share a device"), std::string::npos) << msg;
  Variable q64(q.to(DType::f64).to(gpu), true);
  msg = testing::error_message([&] { lasp2_attention(q64, q64, q64, lambdas, 1.0, 64, layout, world()); });
  EXPECT_NE(msg.find("f32 or bf16"), std::string::npos) << msg;
}

}  // namespace
}  // namespace loom
