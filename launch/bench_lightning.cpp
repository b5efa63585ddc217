// loom-bench-lightning [--min-t N] [--max-t N] [--reps N]
// Times the CUDA lightning attention kernels (kernels/cuda/lightning.h) at the
// PERF.md shape: B = 1, H = 16, D = 128, bf16, T from --min-t (default 4K) times 4 up
// to --max-t (default 1M), per-head decays from the TransNormer schedule (layer 1 of 24).
// Per T: forward and forward + backward tokens/s (median of --reps CUDA-event
// timings after one warm-up; the backward reuses the segment states the forward
// saved, as in training), the bandwidth floor of each (q, k, v, o read or
// written once forward; q, k, v, dout read and dq, dk, dv written backward, at
// the device-to-device copy rate measured in the same run) and the peak
// device memory of Storage allocations during the timed calls. Inputs are
// random bf16 (a 16K-token random block repeated along T), never zeros.
// Without a GPU it says so and exits 0.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "framework/error.h"
#include "framework/storage.h"
#include "framework/stream.h"
#include "framework/tensor.h"

#ifdef LOOM_WITH_CUDA
#include "kernels/cuda/lightning.h"
#endif

namespace {

using namespace loom;

#ifdef LOOM_WITH_CUDA

Device gpu() { return Device::cuda(0); }

// Median time in ms of fn() over `reps` runs after one warm-up.
double time_ms(Stream& s, int reps, const std::function<void()>& fn) {
  fn();
  Event start(s.device()), stop(s.device());
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    start.record(s);
    fn();
    stop.record(s);
    stop.synchronize();
    ms.push_back(start.elapsed_ms(stop));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// (1, T, H, D) bf16 on the GPU: `block` random tokens (from `seed`) repeated along T.
Tensor random_bf16(int64_t T, int64_t H, int64_t D, uint64_t seed, Stream& s) {
  const int64_t block = std::min<int64_t>(T, 16384);
  Tensor host = Tensor::empty({1, block, H, D}, DType::f32);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) p[i] = uniform(rng);
  Tensor chunk = host.to(DType::bf16).to(gpu());
  Tensor t = Tensor::empty({1, T, H, D}, DType::bf16, gpu());
  const size_t chunk_bytes = chunk.nbytes();
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const size_t bytes = std::min(chunk_bytes, t.nbytes() - static_cast<size_t>(t0 * H * D * 2));
    copy_bytes(static_cast<char*>(t.raw_data()) + t0 * H * D * 2, gpu(), chunk.raw_data(), gpu(), bytes, &s);
  }
  return t;
}

double copy_gbps(Stream& s) {
  const size_t bytes = size_t{1} << 30;
  Storage src(bytes, gpu(), &s), dst(bytes, gpu(), &s);
  const double ms = time_ms(s, 10, [&] { copy_bytes(dst.data(), gpu(), src.data(), gpu(), bytes, &s); });
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

int run(int64_t min_t, int64_t max_t, int reps) {
  if (!cuda_is_available()) {
    std::printf("loom-bench-lightning: no usable GPU (%s); nothing to time.\n", cuda_unavailable_reason().c_str());
    return 0;
  }
  Stream& s = Stream::default_for(gpu());
  const int64_t H = 16, D = 128, layer = 1, layers = 24;
  std::vector<double> lambdas(H);
  for (int64_t h = 0; h < H; ++h) lambdas[h] = 8.0 * h / H * (1.0 - static_cast<double>(layer) / layers);
  Tensor decay = Tensor::from_vector<double>(lambdas, {H});
  const double so = 1.0 / std::sqrt(static_cast<double>(D));
  const double gbps = copy_gbps(s);
  std::printf("loom-bench-lightning: B 1, H %lld, D %lld, bf16; copy %.0f GB/s; median of %d\n",
              static_cast<long long>(H), static_cast<long long>(D), gbps, reps);
  std::printf("%9s %12s %12s %10s %14s %14s %10s %10s\n", "T", "fwd ms", "fwd+bwd ms", "fwd Mtok/s",
              "fwd+bwd Mtok/s", "fwd floor", "fb floor", "peak GiB");
  for (int64_t T = min_t; T <= max_t; T *= 4) {
    Tensor q = random_bf16(T, H, D, 1, s), k = random_bf16(T, H, D, 2, s), v = random_bf16(T, H, D, 3, s);
    Tensor dout = random_bf16(T, H, D, 4, s);
    Tensor out = Tensor::empty(q.shape(), DType::bf16, gpu());
    Tensor dq = Tensor::empty(q.shape(), DType::bf16, gpu()), dk = dq.clone(), dv = dq.clone();
    Tensor sf = Tensor::zeros({1, H, D, D}, DType::f32, gpu()), ds0 = sf.clone(), dsf = sf.clone();
    Tensor s0;  // zero initial state
    s.synchronize();
    reset_peak_memory(gpu());
    Tensor saved;  // the segments' entering states, as training keeps them for the backward
    auto forward = [&] { cuda::lightning_forward(out, sf, q, k, v, s0, decay, so, 64, s, &saved); };
    auto both = [&] {
      forward();
      cuda::lightning_backward(dq, dk, dv, ds0, dout, dsf, q, k, v, s0, decay, so, 64, s, saved);
    };
    const double fwd = time_ms(s, reps, forward);
    const double fb = time_ms(s, reps, both);
    const double peak = static_cast<double>(memory_stats(gpu()).peak_bytes) / (1 << 30);
    const double token_bytes = 2.0 * H * D;  // one bf16 row of all heads
    const double fwd_floor = gbps * 1e9 / (4 * token_bytes) / 1e6;   // q, k, v, o
    const double fb_floor = gbps * 1e9 / (11 * token_bytes) / 1e6;   // + dout, q, k, v, dq, dk, dv
    std::printf("%9lld %12.3f %12.3f %10.1f %14.1f %14.1f %10.1f %10.2f\n", static_cast<long long>(T), fwd, fb,
                T / (fwd * 1e-3) / 1e6, T / (fb * 1e-3) / 1e6, fwd_floor, fb_floor, peak);
    std::fflush(stdout);
  }
  return 0;
}

#else

int run(int64_t, int64_t, int) {
  std::printf("loom-bench-lightning: built without CUDA (no nvcc at configure time); nothing to time.\n");
  return 0;
}

#endif

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loom-bench-lightning: lightning attention kernel timings (B 1, H 16, D 128, bf16)"};
  int64_t min_t = 4096, max_t = int64_t{1} << 20;
  int reps = 10;
  app.add_option("--min-t", min_t, "smallest T")->check(CLI::Range(int64_t{1}, int64_t{1} << 22));
  app.add_option("--max-t", max_t, "largest T (4K, 16K, ... up to it)")->check(CLI::Range(int64_t{4096}, int64_t{1} << 22));
  app.add_option("--reps", reps, "timed repetitions per row (median reported)")->check(CLI::Range(1, 1000));
  CLI11_PARSE(app, argc, argv);
  try {
    return run(min_t, max_t, reps);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "loom-bench-lightning: %s\n", e.what());
    return 1;
  }
}
