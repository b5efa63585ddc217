// loom-bench-sp: one mixer layer's forward and forward + backward under
// sequence (context) parallelism over all ranks of the run (cp = world size),
// at a fixed number of tokens per rank: the per-layer numbers of a cp scaling
// table (issue 9). Run it at -np 1, 2, 4, 8 with the same --tokens-per-rank;
// the efficiency at cp = P is tokens/s per rank at P over the same at P = 1.
//   mpirun -np P build/loom-bench-sp --layer L|S [--softmax ring|allgather]
//       [--layout zigzag|contiguous] [--tokens-per-rank N] [--batch B]
//       [--d-model C] [--heads H] [--device cpu|cuda] [--dtype f32|bf16] [--reps N]
// The layer is built as loom-train builds it (model.layers = L or S, head dim
// C / H, lightning decays of layer 1 of 24), its parameters random; inputs and
// upstream gradients random. Times: the slowest rank's wall time per call (all
// ranks start together after a barrier; CUDA work is waited for), median of
// --reps after one warm-up. Bytes: what this rank sends per forward + backward
// through the cp group (LASP-2's state all-gathers, ring hops or the
// all-gather of K, V). Rank 0 prints one table row; for the ring on CUDA also
// where one forward + backward's hop time went on rank 0 (compute, transfer,
// the transfer time compute had to wait for, and the share of the transfer
// hidden behind compute: 1 - exposed / transfer), from CUDA events read after
// that call (not during the timed ones).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "framework/random.h"
#include "framework/stream.h"
#include "models/decoder.h"
#include "models/layer.h"
#include "parallel/comm_stats.h"
#include "parallel/mesh.h"
#include "parallel/mpi_context.h"
#include "parallel/sp_attention.h"
#include "parallel/token_layout.h"

namespace loom {
namespace {

struct Options {
  std::string layer = "L", softmax = "ring", layout = "zigzag", device = "cpu", dtype = "f32";
  int64_t tokens_per_rank = 4096, batch = 1, d_model = 256, heads = 4;
  int reps = 10;
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

int run(const Options& o, MpiContext& mpi) {
  MpiCommunicator& world = mpi.world();
  const int P = world.size();
  LOOM_CHECK(o.layer == "L" || o.layer == "S") << "--layer " << o.layer << " must be L or S";
  LOOM_CHECK(o.d_model % o.heads == 0) << "--d-model " << o.d_model << " must be a multiple of --heads " << o.heads;
  const Device device = select_device(o.device, world);
  MeshSizes sizes;
  sizes.cp = P;
  DeviceMesh mesh(sizes, world, device);
  Communicator& cp = mesh.group("cp");
  CommStats stats(cp);

  DecoderConfig config;
  config.d_model = o.d_model;
  config.n_heads = o.heads;
  config.n_kv_heads = o.heads;
  config.head_dim = o.d_model / o.heads;
  config.layers = o.layer;
  config.n_layers = 24;  // the lightning decays of layer 1 of 24 (λ_h = 8 h / H · (1 − 1/24))
  config.max_seq_len = o.tokens_per_rank * P;
  config.dtype = DType::f32;
  std::shared_ptr<Mixer> mixer = builtin_mixers().create(o.layer[0], config, 1);
  Generator gen(1234);
  for (const Parameter& p : mixer->named_parameters()) {
    Tensor data = p.var.data();
    if (p.name.find("norm") != std::string::npos) {
      data.fill_(1.0);
    } else {
      Tensor r = randn(data.shape(), gen, DType::f32);
      float* v = r.data<float>();
      for (int64_t i = 0; i < r.numel(); ++i) v[i] *= 0.02f;
      data.copy_(r);
    }
  }
  const DType dtype = dtype_from_name(o.dtype);
  if (device.is_cuda()) mixer->to(device);
  if (dtype != DType::f32) mixer->to(dtype);

  const int64_t T = o.tokens_per_rank * P;
  auto layout = std::make_shared<TokenLayout>(parse_layout_kind(o.layout), T, P);
  SequenceContext base;
  base.cp.layout = layout;
  base.cp.comm = &cp;
  base.cp.softmax = o.softmax;
  base.cp.stats = &stats;
  SpAttentionStats attention;  // S layers: hop timings of one call (ring on CUDA)
  base.cp.attention_stats = &attention;
  base.positions = layout->positions(world.rank());
  const Shape shape{o.batch, o.tokens_per_rank, o.d_model};
  Generator data_gen(99 + static_cast<uint64_t>(world.rank()));
  Tensor x_data = randn(shape, data_gen, DType::f32).to(dtype).to(device);
  Tensor upstream = randn(shape, data_gen, DType::f32).to(dtype).to(device);
  Stream& stream = Stream::default_for(device);

  // One call: forward (and backward); returns the slowest rank's ms of each.
  auto call = [&](bool with_backward, double& fwd_ms, double& total_ms) {
    SequenceContext ctx = base;
    Variable x(x_data, true);
    world.barrier();
    const double t0 = now_ms();
    Variable out = mixer->forward(x, ctx);
    stream.synchronize();
    const double t1 = now_ms();
    if (with_backward) out.backward(upstream);
    stream.synchronize();
    const double t2 = now_ms();
    Tensor times = Tensor::from_vector<double>({t1 - t0, t2 - t0}, {2});
    world.all_reduce(times, ReduceOp::max, Stream::default_for(Device::cpu()));
    fwd_ms = times.data<double>()[0];
    total_ms = times.data<double>()[1];
  };
  double f = 0, t = 0;
  call(true, f, t);  // warm-up (plans, workspaces, the NCCL communicators)
  stats.reset();
  attention = SpAttentionStats{};
  attention.time_ring_hops = device.is_cuda();
  call(true, f, t);
  const SpAttentionStats measured = attention;
  attention.time_ring_hops = false;
  const std::map<std::string, double> sent = stats.bytes();
  double bytes = 0;
  for (const auto& [key, b] : sent) bytes += b;
  std::vector<double> fwd, both;
  for (int r = 0; r < o.reps; ++r) {
    call(false, f, t);
    fwd.push_back(f);
    call(true, f, t);
    both.push_back(t);
  }
  const double fwd_ms = median(fwd), both_ms = median(both);
  if (world.rank() == 0) {
    const double tokens = static_cast<double>(o.batch * o.tokens_per_rank);
    std::printf("loom-bench-sp: layer %s%s, cp %d (%s), B %lld, tokens/rank %lld, d %lld, heads %lld, %s on %s, "
                "median of %d\n",
                o.layer.c_str(), o.layer == "S" ? (" " + o.softmax).c_str() : "", P, o.layout.c_str(),
                static_cast<long long>(o.batch), static_cast<long long>(o.tokens_per_rank),
                static_cast<long long>(o.d_model), static_cast<long long>(o.heads), o.dtype.c_str(),
                device.str().c_str(), o.reps);
    std::printf("%4s %10s %12s %14s %18s %16s\n", "cp", "fwd ms", "fwd+bwd ms", "fwd tok/s/rank", "fwd+bwd tok/s/rank",
                "MB sent/rank");
    std::printf("%4d %10.3f %12.3f %14.0f %18.0f %16.3f\n", P, fwd_ms, both_ms, tokens / (fwd_ms * 1e-3),
                tokens / (both_ms * 1e-3), bytes / 1e6);
    if (o.layer == "S" && o.softmax == "ring") {
      auto hops = [](const char* pass, const RingHopTimes& h) {
        if (h.hops == 0) return;
        std::printf("ring %s, rank 0: %lld hops, compute %.3f ms, transfer %.3f ms, exposed %.3f ms, hidden %.1f%%\n",
                    pass, static_cast<long long>(h.hops), h.compute_ms, h.transfer_ms, h.exposed_ms,
                    h.transfer_ms > 0 ? 100.0 * (1.0 - h.exposed_ms / h.transfer_ms) : 100.0);
      };
      if (measured.forward_hops.hops + measured.backward_hops.hops == 0)
        std::printf("ring hop timing: CUDA only (none on %s)\n", device.str().c_str());
      hops("forward", measured.forward_hops);
      hops("backward", measured.backward_hops);
    }
  }
  return 0;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiContext mpi(&argc, &argv);
  CLI::App app{"loom-bench-sp: one mixer layer under sequence parallelism (cp = the number of ranks)"};
  loom::Options o;
  app.add_option("--layer", o.layer, "L (lightning, LASP-2) or S (softmax attention)")->check(CLI::IsMember({"L", "S"}));
  app.add_option("--softmax", o.softmax, "S layers: ring or allgather (LASP-2H)")
      ->check(CLI::IsMember({"ring", "allgather"}));
  app.add_option("--layout", o.layout, "token layout over the cp ranks")->check(CLI::IsMember({"zigzag", "contiguous"}));
  app.add_option("--tokens-per-rank", o.tokens_per_rank, "tokens of each sequence on each rank")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 24));
  app.add_option("--batch", o.batch, "sequences")->check(CLI::Range(int64_t{1}, int64_t{1024}));
  app.add_option("--d-model", o.d_model, "model width C")->check(CLI::Range(int64_t{8}, int64_t{65536}));
  app.add_option("--heads", o.heads, "heads H (head dim C / H)")->check(CLI::Range(int64_t{1}, int64_t{1024}));
  app.add_option("--device", o.device, "cpu or cuda (one GPU per rank, by node-local rank)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--dtype", o.dtype, "f32 or bf16")->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--reps", o.reps, "timed calls per row (median)")->check(CLI::Range(1, 1000));
  CLI11_PARSE(app, argc, argv);
  try {
    return loom::run(o, mpi);
  } catch (const std::exception& e) {
    loom::abort_all(std::string("loom-bench-sp: ") + e.what(), 1);
  }
}
