// Sequence-parallel softmax attention on GPUs (parallel/ring_attention.h,
// parallel/allgather_attention.h) under mpirun, one GPU per rank (local
// rank), cp = the world size:
//  - ring and all-gather attention equal the 1-rank attention op over the
//    whole sequence, computed on each rank's own GPU (out, lse and the
//    gradients of q, k, v from a loss using both), for both layouts, f32 and
//    bf16, plain / GQA / S2, non-causal and rows with no visible key; both
//    through a CUDA mesh's cp group (NCCL for the data, MPI for the host
//    positions) and through a bare NcclCommunicator; traffic as predicted;
//  - a ring of P shards simulated on one device (no communication) merges and
//    accumulates exactly, so the merge across blocks is checked even at np 1
//    (on the CPU in f64 everywhere, on the GPU in f32 and bf16);
//  - overlap: a ring hop (sp::RingHop, a self-hop at np 1) posted before an
//    attention kernel is hidden behind it, and the real ring reports its hop
//    timings. Both print "ring step compute X ms, transfer Y ms, exposed Z ms".
// The GPU tests skip (on every rank alike) without a GPU per rank.
//
// Tolerances: f32 runs the same fp32 arithmetic in another order (2e-5 at the
// tensor's scale). bf16: the 1-rank op rounds out and each gradient once; the
// ring rounds each block's partial out and gradient terms once more before the
// fp32 merge / accumulation, and its backward reads its own rounded out, so a
// few bf16 ulps (2^-8 relative) separate them: 2^-6 at the tensor's scale.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>

#include "framework/ops.h"
#include "framework/storage.h"
#include "kernels/dispatch.h"
#include "parallel/allgather_attention.h"
#include "parallel/cuda/nccl_communicator.h"
#include "parallel/mesh.h"
#include "parallel/mpi_communicator.h"
#include "parallel/ring_attention.h"
#include "parallel/sp_attention.h"
#include "parallel/token_layout.h"
#include "tests/cuda_parallel/cuda_parallel_testing.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/sp/sp_attention_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::global_tensor;
using testing::my_gpu;
using testing::world;

using testing::kAllGather;
using testing::kRing;
using testing::SpAttentionFn;
using testing::WholeSequenceAttention;
using testing::whole_sequence_attention;

struct Case {
  LayoutKind layout = LayoutKind::zigzag;
  int64_t B = 2, T = 0, H = 2, Hkv = 2, D = 64;  // T = 0: 24 tokens per layout chunk
  DType dtype = DType::f32;
  bool causal = true;
  S2Pattern s2;
  int64_t k_shift = 0;  // keys at positions + k_shift (the first k_shift queries see no key)
};

std::string describe(const Case& c) {
  std::string s = std::string(layout_kind_name(c.layout)) + " H" + std::to_string(c.H) + "kv" +
                  std::to_string(c.Hkv) + " " + dtype_name(c.dtype);
  if (!c.causal) s += " non-causal";
  if (c.s2.enabled()) s += " s2 block " + std::to_string(c.s2.block);
  if (c.k_shift != 0) s += " k_shift " + std::to_string(c.k_shift);
  return s;
}

double tolerance(DType dtype) { return dtype == DType::bf16 ? std::ldexp(1.0, -6) : 2e-5; }

double max_abs(const Tensor& t) {
  double m = 0;
  for (double x : t.to_vector<double>())
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

// A device tensor (any dtype) against a device reference, on the host in f64,
// relative tolerance `tol` and absolute tol at the reference's scale.
::testing::AssertionResult close(const Tensor& got, const Tensor& want, double tol) {
  Tensor g = got.to(Device::cpu()).to(DType::f64), w = want.to(Device::cpu()).to(DType::f64);
  return testing::tensors_close(g, w, tol, tol * std::max(1.0, max_abs(w)));
}

// Runs `fn` on this rank's shards on its GPU and compares with attention()
// over the whole sequence on the same GPU. Returns this rank's stats.
SpAttentionStats expect_matches_one_rank(const SpAttentionFn& fn, const Case& c, Communicator& cp, Device gpu) {
  const int P = cp.size(), rank = cp.rank();
  const int64_t T = c.T > 0 ? c.T : 2 * P * 24;
  const Shape q_shape{c.B, T, c.H, c.D}, kv_shape{c.B, T, c.Hkv, c.D};
  Tensor q = global_tensor(q_shape, 11, c.dtype, gpu), k = global_tensor(kv_shape, 12, c.dtype, gpu);
  Tensor v = global_tensor(kv_shape, 13, c.dtype, gpu), dout = global_tensor(q_shape, 14, c.dtype, gpu);
  Tensor dlse = global_tensor({c.B, c.H, T}, 15, DType::f32, gpu);  // lse is fp32 on CUDA
  Tensor k_positions = Tensor::arange(T, DType::i64);
  for (int64_t i = 0; i < T; ++i) k_positions.data<int64_t>()[i] += c.k_shift;

  AttentionOptions whole;
  whole.causal = c.causal;
  whole.s2 = c.s2;
  whole.k_positions = k_positions;
  const WholeSequenceAttention ref = whole_sequence_attention(q, k, v, whole, dout, dlse);

  TokenLayout layout(c.layout, T, P);
  AttentionOptions local = whole;
  local.q_positions = layout.positions(rank);
  local.k_positions = layout.shard(k_positions, rank, 0);
  if (c.k_shift == 0) local.q_positions = local.k_positions = Tensor();  // defaults: the layout's positions
  Variable lq(layout.shard(q, rank, 1), true), lk(layout.shard(k, rank, 1), true), lv(layout.shard(v, rank, 1), true);
  SpAttentionStats stats;
  AttentionResult got = fn(lq, lk, lv, local, layout, cp, &stats);
  EXPECT_EQ(got.out.dtype(), c.dtype);
  EXPECT_EQ(got.lse.dtype(), DType::f32);
  EXPECT_EQ(got.out.device(), gpu);
  run_backward({got.out, got.lse}, {layout.shard(dout, rank, 1), layout.shard(dlse, rank, 2)});

  const double tol = tolerance(c.dtype);
  SCOPED_TRACE(describe(c) + ", rank " + std::to_string(rank) + " of " + std::to_string(P));
  EXPECT_TRUE(close(got.out.data(), layout.shard(ref.result.out.data(), rank, 1), tol)) << "out";
  EXPECT_TRUE(close(got.lse.data(), layout.shard(ref.result.lse.data(), rank, 2), tol)) << "lse";
  EXPECT_TRUE(close(lq.grad(), layout.shard(ref.q.grad(), rank, 1), tol)) << "dq";
  EXPECT_TRUE(close(lk.grad(), layout.shard(ref.k.grad(), rank, 1), tol)) << "dk";
  EXPECT_TRUE(close(lv.grad(), layout.shard(ref.v.grad(), rank, 1), tol)) << "dv";
  return stats;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  for (LayoutKind layout : {LayoutKind::zigzag, LayoutKind::contiguous})
    for (DType dtype : {DType::f32, DType::bf16})
      for (int variant = 0; variant < 5; ++variant) {
        Case c;
        c.layout = layout;
        c.dtype = dtype;
        if (variant >= 1) c.H = 4;                          // GQA: 4 query heads over 2 kv heads
        if (variant == 2) c.s2 = S2Pattern{16, 1, 3};       // block 16 (straddles 24-token chunks)
        if (variant == 3) c.causal = false;
        if (variant == 4) c.k_shift = 5;                    // empty rows; explicit positions
        all.push_back(c);
      }
  return all;
}

void check_traffic(const SpAttentionStats& stats, const Case& c, int P, bool ring) {
  const int64_t Tl = 2 * 24;  // local tokens (T = 2 P 24)
  if (ring) {
    EXPECT_EQ(stats.forward_bytes_sent, ring_attention_forward_bytes(c.B, Tl, c.Hkv, c.D, c.dtype, P));
    EXPECT_EQ(stats.backward_bytes_sent, ring_attention_backward_bytes(c.B, Tl, c.Hkv, c.D, c.dtype, P));
  } else {
    EXPECT_EQ(stats.forward_bytes_sent, allgather_attention_forward_bytes(c.B, Tl, c.Hkv, c.D, c.dtype, P));
    EXPECT_EQ(stats.backward_bytes_sent, allgather_attention_backward_bytes(c.B, Tl, c.Hkv, c.D, c.dtype, P));
  }
}

TEST(SpAttentionCuda, RingAndAllGatherThroughTheMeshEqualOneRank) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("sequence-parallel CUDA test");
  const Device gpu = my_gpu();
  const int P = world().size();
  DeviceMesh mesh(MeshSizes{0, P, 1}, world(), gpu);
  Communicator& cp = mesh.group("cp");
  for (const Case& c : cases()) {
    check_traffic(expect_matches_one_rank(kRing, c, cp, gpu), c, P, true);
    check_traffic(expect_matches_one_rank(kAllGather, c, cp, gpu), c, P, false);
  }
}

// A bare NCCL communicator takes no CPU tensors: explicit positions are
// gathered on the device (k_shift cases) and the rest is the same.
TEST(SpAttentionCuda, RingAndAllGatherOverABareNcclCommunicatorEqualOneRank) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("sequence-parallel CUDA test");
  const Device gpu = my_gpu();
  NcclCommunicator nccl(world(), gpu);
  for (const Case& c : cases()) {
    if (c.layout != LayoutKind::zigzag || (c.H != 4 && c.k_shift == 0)) continue;  // a subset: GQA, S2, empty rows
    expect_matches_one_rank(kRing, c, nccl, gpu);
    expect_matches_one_rank(kAllGather, c, nccl, gpu);
  }
}

TEST(SpAttentionCuda, MixedDevicesAndF64OnCudaAreErrors) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("sequence-parallel CUDA test");
  const Device gpu = my_gpu();
  const int P = world().size();
  TokenLayout layout(LayoutKind::zigzag, 2 * P * 4, P);
  Tensor q = testing::random_tensor({1, layout.local_len(), 2, 8}, 1, DType::f32);
  Variable qg(q.to(gpu), true), kc(q, true);
  const std::string msg = testing::error_message(
      [&] { ring_attention(qg, kc, kc, AttentionOptions{}, layout, world(), nullptr); });
  EXPECT_NE(msg.find("must share a device"), std::string::npos) << msg;
  Variable q64(q.to(DType::f64).to(gpu), true);
  EXPECT_THROW(allgather_attention(q64, q64, q64, AttentionOptions{}, layout, world(), nullptr), Error);
}

// P shards of a zigzag layout attended one after another by each simulated
// rank on one device, with the planner, the merge and the accumulators the
// ring uses (fp32 for bf16 data); summing the simulated ranks' dK, dV terms
// per shard gives the whole gradient. No communication: runs at any np, on
// the CPU in f64 (always: it checks this test's own bookkeeping) and on the
// GPU in f32 and bf16.
void expect_simulated_ring_exact(Device device, DType dtype, int P) {
  SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << " on " << device << ", simulated cp " << P);
  Stream& stream = Stream::default_for(device);
  const int64_t B = 1, H = 4, Hkv = 2, D = 40, T = 2 * P * 17;  // 17-token chunks, D not a power of two
  const Shape q_shape{B, T, H, D}, kv_shape{B, T, Hkv, D};
  Tensor q = global_tensor(q_shape, 21, dtype, device), k = global_tensor(kv_shape, 22, dtype, device);
  Tensor v = global_tensor(kv_shape, 23, dtype, device), dout = global_tensor(q_shape, 24, dtype, device);
  AttentionOptions whole;
  whole.s2 = S2Pattern{8, 2, 3};
  Variable gq(q, true), gk(k, true), gv(v, true);
  AttentionResult ref = attention(gq, gk, gv, whole);
  ref.out.backward(dout);

  const double tol = dtype == DType::f64 ? 1e-12 : tolerance(dtype);
  TokenLayout layout(LayoutKind::zigzag, T, P);
  const int64_t Tl = layout.local_len();
  const DType acc = dtype == DType::bf16 ? DType::f32 : dtype;
  std::vector<Tensor> dk(P), dv(P);
  for (int s = 0; s < P; ++s) {
    dk[s] = Tensor::zeros({B, Tl, Hkv, D}, acc, device);
    dv[s] = Tensor::zeros({B, Tl, Hkv, D}, acc, device);
  }
  for (int r = 0; r < P; ++r) {
    sp::AttentionCall call;
    call.B = B;
    call.T = Tl;
    call.H = H;
    call.Hkv = Hkv;
    call.D = D;
    call.scale = 1.0 / std::sqrt(static_cast<double>(D));
    call.s2 = whole.s2;
    call.chunk = layout.chunks(r).front().length;
    call.device = device;
    call.dtype = dtype;
    call.acc_dtype = acc;
    call.q_positions = layout.positions(r);
    call.k_positions = call.q_positions;
    call.q_positions_device = call.q_positions.to(device);
    Tensor ql = layout.shard(q, r, 1);
    Tensor out = Tensor::zeros({B, Tl, H, D}, acc, device);
    Tensor lse = Tensor::full({B, H, Tl}, -std::numeric_limits<double>::infinity(), acc, device);
    std::vector<std::vector<AttentionBlock>> plans(P);
    for (int i = 0; i < P; ++i) {  // the ring's order: own shard, then r - 1, r - 2, ...
      const int s = (r + P - i) % P;
      plans[s] = plan_attention_blocks(call.q_positions, layout.positions(s), true, call.s2, Hkv, call.chunk);
      sp::attend_forward(out, lse, ql, layout.shard(k, s, 1), layout.shard(v, s, 1), call.q_positions_device,
                         layout.positions(s).to(device), plans[s], call, nullptr, stream);
    }
    EXPECT_TRUE(close(out, layout.shard(ref.out.data(), r, 1), tol)) << "out of rank " << r;
    EXPECT_TRUE(close(lse, layout.shard(ref.lse.data(), r, 2), tol)) << "lse of rank " << r;
    Tensor out_final = out.to(dtype);
    Tensor dq = Tensor::zeros({B, Tl, H, D}, acc, device);
    for (int s = 0; s < P; ++s)
      sp::attend_backward(dq, dk[s], dv[s], layout.shard(dout, r, 1), Tensor(), ql, layout.shard(k, s, 1),
                          layout.shard(v, s, 1), out_final, lse, call.q_positions_device,
                          layout.positions(s).to(device), plans[s], call, nullptr, stream);
    EXPECT_TRUE(close(dq, layout.shard(gq.grad(), r, 1), tol)) << "dq of rank " << r;
  }
  for (int s = 0; s < P; ++s) {
    EXPECT_TRUE(close(dk[s], layout.shard(gk.grad(), s, 1), tol)) << "dk of shard " << s;
    EXPECT_TRUE(close(dv[s], layout.shard(gv.grad(), s, 1), tol)) << "dv of shard " << s;
  }
}

TEST(SpAttentionCuda, SimulatedRingOnTheCpuMergesAndAccumulatesExactly) {
  for (int P : {2, 3}) expect_simulated_ring_exact(Device::cpu(), DType::f64, P);
}

TEST(SpAttentionCuda, SimulatedRingOnOneGpuMergesAndAccumulatesExactly) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("sequence-parallel CUDA test");
  for (DType dtype : {DType::f32, DType::bf16})
    for (int P : {2, 3}) expect_simulated_ring_exact(my_gpu(), dtype, P);
}

// Mean per hop, milliseconds.
void print_hops(const char* what, const RingHopTimes& t, int P, int64_t bytes_per_hop) {
  if (t.hops == 0 || world().rank() != 0) return;
  const double n = static_cast<double>(t.hops);
  std::printf("[%s, cp %d, %.1f MB per hop, %lld hops] ring step compute %.3f ms, transfer %.3f ms, exposed %.3f ms "
              "(step wall %.3f ms)\n",
              what, P, bytes_per_hop / 1e6, static_cast<long long>(t.hops), t.compute_ms / n, t.transfer_ms / n,
              t.exposed_ms / n, t.step_ms / n);
  std::fflush(stdout);
}

// One hop (a self-hop at np 1: the same NCCL send/recv path, to itself)
// posted before attention kernels is hidden behind them. The compute is sized
// from a measured hop alone to last about twice as long. Overlapped, the
// compute stream waits (exposed) for well under half the solo transfer time,
// and a step takes about the compute alone; serialized with the transfer
// after the compute, exposed would be the whole transfer; serialized with the
// compute waiting for the transfer, a step would take its compute (timed on
// the compute stream from after the post) plus the transfer. Both bounds
// leave half a solo transfer of slack (the transfer may slow down a little
// while the attention shares the GPU).
TEST(SpAttentionCuda, RingHopDeliversItsBytesAndReportsOverlap) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("sequence-parallel CUDA test");
  const Device gpu = my_gpu();
  Stream& stream = Stream::default_for(gpu);
  DeviceMesh mesh(MeshSizes{0, world().size(), 1}, world(), gpu);
  Communicator& cp = mesh.group("cp");
  const int P = cp.size(), rank = cp.rank();
  const int64_t n = int64_t{1} << 25;  // 128 MiB of f32 per hop
  Tensor send = Tensor::full({n}, rank + 1.0, DType::f32, gpu), recv = Tensor::full({n}, NAN, DType::f32, gpu);
  auto attention_once = [&](const Tensor& q) {
    Tensor out = Tensor::empty(q.shape(), q.dtype(), gpu);
    Tensor lse = Tensor::empty({q.size(0), q.size(2), q.size(1)}, DType::f32, gpu);
    Tensor no_positions;
    dispatch::attention_forward(out, lse, q, q, q, no_positions, no_positions, 0.1, false, S2Pattern{}, stream);
  };
  // Calls long enough that launching them never starves the GPU, short enough to size the step finely.
  Tensor q = global_tensor({1, 1024, 8, 128}, 31, DType::bf16, gpu);

  // Solo timings (after a warm-up of each): a hop with nothing to hide behind, one attention call.
  RingHopTimes solo;
  for (int rep = 0; rep < 2; ++rep) {
    sp::RingHop hop(cp, stream, /*timed=*/true);
    hop.post(send, recv);
    hop.wait();
    attention_once(q);
    RingHopTimes t;
    hop.add_times(t);
    if (rep == 1) solo = t;
  }
  Event a(gpu), b(gpu);
  a.record(stream);
  attention_once(q);
  b.record(stream);
  b.synchronize();
  const double attention_ms = a.elapsed_ms(b);
  // Every rank must run the same number of kernels in a step: agree on the largest count.
  Tensor reps = Tensor::full({1}, std::ceil(2.0 * solo.transfer_ms / std::max(attention_ms, 1e-3)), DType::f64);
  world().all_reduce(reps, ReduceOp::max, testing::cpu_stream());
  const int per_step = std::max(1, static_cast<int>(reps.data<double>()[0]));

  sp::RingHop hop(cp, stream, /*timed=*/true);
  const int hops = 5;
  for (int h = 0; h < hops; ++h) {
    hop.post(send, recv);
    for (int i = 0; i < per_step; ++i) attention_once(q);
    hop.wait();
  }
  RingHopTimes t;
  hop.add_times(t);
  EXPECT_EQ(t.hops, hops);
  const int from = (rank + P - 1) % P;
  EXPECT_TRUE(testing::tensors_close(recv.narrow(0, n - 7, 7).to(Device::cpu()),
                                     Tensor::full({7}, from + 1.0, DType::f32), 0, 0))
      << "the hop delivered the wrong bytes";
  if (rank == 0)
    std::printf("[solo] hop transfer %.3f ms, one attention %.3f ms; %d attention calls per step\n", solo.transfer_ms,
                attention_ms, per_step);
  print_hops("RingHop", t, P, n * 4);
  const double exposed = t.exposed_ms / hops, compute = t.compute_ms / hops, step = t.step_ms / hops;
  EXPECT_GT(compute, 0.0);
  // Reported, not asserted: speed is measured, never asserted in a unit test. Overlapped, exposed is
  // well under the solo transfer and a step takes about its compute; serialized, exposed is the whole
  // transfer or the step is compute + transfer. The lead reads these lines in kernels/NOTES.md.
  if (rank == 0)
    std::printf("[overlap] per step: compute %.3f ms, exposed wait %.3f ms (solo transfer %.3f ms), step %.3f ms\n",
                compute, exposed, solo.transfer_ms, step);
}

// The real ring with hop timing on: the same results as untimed, P - 1 timed
// forward hops and P + 1 backward hops (P >= 2), and the printed line. Bitwise
// sameness needs the deterministic kernels (the fused backward adds dQ with atomics).
TEST(SpAttentionCuda, RingAttentionReportsItsHopTimes) {
  LOOM_SKIP_WITHOUT_GPU_PER_RANK("sequence-parallel CUDA test");
  struct Deterministic {
    Deterministic() { dispatch::set_deterministic(true); }
    ~Deterministic() { dispatch::set_deterministic(false); }  // the process default
  } deterministic;
  const Device gpu = my_gpu();
  const int P = world().size();
  DeviceMesh mesh(MeshSizes{0, P, 1}, world(), gpu);
  Communicator& cp = mesh.group("cp");
  const int64_t B = 1, H = 16, Hkv = 8, D = 128, T = 2 * P * 1024;
  TokenLayout layout(LayoutKind::zigzag, T, P);
  const Shape q_shape{B, layout.local_len(), H, D}, kv_shape{B, layout.local_len(), Hkv, D};
  Tensor q = global_tensor(q_shape, 41 + cp.rank(), DType::bf16, gpu);
  Tensor k = global_tensor(kv_shape, 51 + cp.rank(), DType::bf16, gpu);
  Tensor v = global_tensor(kv_shape, 61 + cp.rank(), DType::bf16, gpu);
  Tensor dout = global_tensor(q_shape, 71, DType::bf16, gpu);
  Tensor results[2][2];  // [timed][out, dq]
  for (int timed = 0; timed < 2; ++timed) {
    SpAttentionStats stats;
    stats.time_ring_hops = timed == 1;
    Variable lq(q, true), lk(k, true), lv(v, true);
    AttentionResult r = ring_attention(lq, lk, lv, AttentionOptions{}, layout, cp, &stats);
    r.out.backward(dout);
    results[timed][0] = r.out.data().to(Device::cpu()).to(DType::f64);
    results[timed][1] = lq.grad().to(Device::cpu()).to(DType::f64);
    if (timed == 1) {
      EXPECT_EQ(stats.forward_hops.hops, P - 1);
      EXPECT_EQ(stats.backward_hops.hops, P > 1 ? P + 1 : 0);
      print_hops("ring_attention forward", stats.forward_hops, P,
                 ring_attention_forward_bytes(B, layout.local_len(), Hkv, D, DType::bf16, P) / std::max(1, P - 1));
      print_hops("ring_attention backward", stats.backward_hops, P,
                 ring_attention_backward_bytes(B, layout.local_len(), Hkv, D, DType::bf16, P) / (P + 1));
    } else {
      EXPECT_EQ(stats.forward_hops.hops, 0);
    }
  }
  EXPECT_TRUE(testing::tensors_close(results[1][0], results[0][0], 0, 0)) << "timing changed the output";
  EXPECT_TRUE(testing::tensors_close(results[1][1], results[0][1], 0, 0)) << "timing changed dq";
}

}  // namespace
}  // namespace loom
