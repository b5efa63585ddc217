// Lightning attention (see lightning.h). Every pass runs one chunk kernel
// (lightning_pass.cuh has the per-chunk algebra): bf16 storage on tensor cores
// (lightning_mma.cuh: one block per (batch, head, segment) holding the whole
// D x D state in registers), f32 storage on CUDA cores in fp32 (below: a block
// keeps a (D, 32) column tile of the state in shared memory, so a head's state
// is split over D/32 blocks, each recomputing A). A block walks the 64-token
// chunks of one segment. The sequence is cut into segments so that B = 1,
// H = 16 still fills the GPU at any T (LASP-2's algebra, ALGORITHMS.md §5,
// inside one device):
//   1. state-only pass: each segment's local state from zero (M_r; decay a_r = gamma^len_r)
//   2. scan per state element: P_0 = S0, P_r = a_{r-1} P_{r-1} + M_{r-1} (G: the suffix from dS_final)
//   3. output pass per segment from P_r.
// (n <= 64 tokens; p[m] = gamma^m; forward w_inter[i] = inter * p[i+1],
// w_update[j] = update * p[n-1-j]; reverse w_inter[i] = inter * p[n-1-i],
// w_update[j] = update * p[j+1].) The passes (kernels/cpu/lightning.cpp has the algebra):
//   forward  out = o:  x q, y k, z v,  St = S     (from S0),    writes S_final
//   dq     forward:    x do, y v, z k, St = S^T   (from S0^T)
//   dv     reverse:    x k, y q, z do, St = G     (from dS_final), writes dS_initial
//   dk     reverse:    x v, y do, z q, St = G^T   (from dS_final^T)
// (dq, dk, dv are one launch; the backward's state-only pass computes the S
// and G locals in one launch). Each output element is written by one thread
// in a fixed order (deterministic, no atomics).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/lightning.h"
#include "kernels/cuda/lightning_mma.cuh"
#include "kernels/cuda/lightning_pass.cuh"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace loom::cuda {

namespace {

using namespace lightning_detail;

// dst (kChunk, `cols` of stride) <- rows [t0, t0 + n) of one head, columns [c0, c0 + cols) (zero padded).
template <typename T>
__device__ __forceinline__ void load_chunk(float* dst, int stride, int cols, const T* src, const PassSet& ps,
                                           int64_t b, int64_t h, int64_t t0, int n, int64_t c0) {
  for (int e = threadIdx.x; e < kChunk * cols; e += kThreads) {
    const int r = e / cols, c = e % cols;
    const int64_t col = c0 + c;
    float value = 0.f;
    if (src != nullptr && r < n && col < ps.D) value = to_float(src[((b * ps.T + t0 + r) * ps.H + h) * ps.D + col]);
    dst[r * stride + c] = value;
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) lightning_chunk_kernel(PassSet ps) {
  constexpr int kXs = kD + 1;         // row stride of x, y tiles (rows read across lanes: conflict-free)
  constexpr int kAs = kChunk + 1;
  constexpr int kStateRows = kD / 16;  // state rows per thread
  extern __shared__ float smem[];
  float* xs = smem;                    // (kChunk, kXs)
  float* ys = xs + kChunk * kXs;       // (kChunk, kXs)
  float* zs = ys + kChunk * kXs;       // (kChunk, kCols)
  float* as = zs + kChunk * kCols;     // (kChunk, kAs)
  float* st = as + kChunk * kAs;       // (kD, kCols)
  float* pw = st + kD * kCols;         // (kChunk + 1)
  float* w_inter = pw + kChunk + 1;    // (kChunk)
  float* w_update = w_inter + kChunk;  // (kChunk)

  const int which = blockIdx.x / ps.tiles;  // selected by value: no dynamic indexing into the parameters
  const Pass pass = which == 0 ? ps.pass[0] : which == 1 ? ps.pass[1] : ps.pass[2];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % ps.tiles) * kCols;
  const int64_t h = blockIdx.y, b = blockIdx.z / ps.segments;
  const int segment = static_cast<int>(blockIdx.z % ps.segments);
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;  // this thread's rows ti + 16 r, columns tj + 16 c
  const T* x = static_cast<const T*>(pass.x);
  const T* y = static_cast<const T*>(pass.y);
  const T* z = static_cast<const T*>(pass.z);
  const int64_t state_base = (b * ps.H + h) * ps.D * ps.D;

  for (int m = threadIdx.x; m <= kChunk; m += kThreads) pw[m] = ps.powers[h * (kChunk + 1) + m];
  const float* in = pass.state_in == nullptr ? nullptr : pass.state_in + segment * pass.state_in_stride + state_base;
  for (int e = threadIdx.x; e < kD * kCols; e += kThreads) {
    const int r = e / kCols, c = e % kCols;
    const int64_t col = c0 + c;
    float value = 0.f;
    if (in != nullptr && r < ps.D && col < ps.D) value = in[pass.transpose_in ? col * ps.D + r : r * ps.D + col];
    st[r * kCols + c] = value;
  }

  const int64_t seg_t0 = segment * ps.seg_len;
  const int64_t seg_t1 = seg_t0 + ps.seg_len < ps.T ? seg_t0 + ps.seg_len : ps.T;
  const int64_t chunks = seg_t1 > seg_t0 ? (seg_t1 - seg_t0 + kChunk - 1) / kChunk : 0;
  for (int64_t step = 0; step < chunks; ++step) {
    const int64_t chunk = pass.reverse ? chunks - 1 - step : step;
    const int64_t t0 = seg_t0 + chunk * kChunk;
    const int n = static_cast<int>(seg_t1 - t0 < kChunk ? seg_t1 - t0 : kChunk);
    __syncthreads();  // previous chunk's tiles are consumed
    if (!pass.state_only) load_chunk<T>(xs, kXs, kD, x, ps, b, h, t0, n, 0);
    load_chunk<T>(ys, kXs, kD, y, ps, b, h, t0, n, 0);
    load_chunk<T>(zs, kCols, kCols, z, ps, b, h, t0, n, c0);
    if (threadIdx.x < kChunk) {
      const int i = threadIdx.x;
      const bool valid = i < n;
      w_inter[i] = valid ? pass.inter * pw[pass.reverse ? n - 1 - i : i + 1] : 0.f;
      w_update[i] = valid ? pass.update * pw[pass.reverse ? i + 1 : n - 1 - i] : 0.f;
    }
    __syncthreads();

    // A (kChunk, kChunk): 4 x 4 entries per thread.
    if (!pass.state_only) {
      float acc[4][4] = {};
#pragma unroll 4
      for (int d = 0; d < kD; ++d) {
        float xv[4], yv[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) xv[r] = xs[(ti + 16 * r) * kXs + d];
#pragma unroll
        for (int c = 0; c < 4; ++c) yv[c] = ys[(tj + 16 * c) * kXs + d];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] += xv[r] * yv[c];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int i = ti + 16 * r, j = tj + 16 * c;
          const int lag = pass.reverse ? j - i : i - j;
          as[i * kAs + j] = lag >= 0 ? pass.intra * pw[lag] * acc[r][c] : 0.f;
        }
    }
    __syncthreads();

    // out (kChunk, kCols): rows ti + 16 r, columns tj + 16 c.
    if (!pass.state_only) {
      float intra[4][2] = {}, inter[4][2] = {};
#pragma unroll 4
      for (int j = 0; j < kChunk; ++j) {
        const float z0 = zs[j * kCols + tj], z1 = zs[j * kCols + tj + 16];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float a = as[(ti + 16 * r) * kAs + j];
          intra[r][0] += a * z0;
          intra[r][1] += a * z1;
        }
      }
#pragma unroll 4
      for (int d = 0; d < kD; ++d) {
        const float s0 = st[d * kCols + tj], s1 = st[d * kCols + tj + 16];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float xv = xs[(ti + 16 * r) * kXs + d];
          inter[r][0] += xv * s0;
          inter[r][1] += xv * s1;
        }
      }
      T* out = static_cast<T*>(pass.out);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = ti + 16 * r;
        if (i >= n) continue;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t col = c0 + tj + 16 * c;
          if (col < ps.D)
            out[((b * ps.T + t0 + i) * ps.H + h) * ps.D + col] = from_float<T>(intra[r][c] + w_inter[i] * inter[r][c]);
        }
      }
    }
    __syncthreads();  // st is read above and rewritten below

    // St = p[n] St + sum_j w_update[j] y_j^T z_j: rows ti + 16 m, columns tj + 16 c.
    {
      float acc[kStateRows][2] = {};
#pragma unroll 2
      for (int j = 0; j < kChunk; ++j) {
        const float w = w_update[j];
        const float z0 = w * zs[j * kCols + tj], z1 = w * zs[j * kCols + tj + 16];
#pragma unroll
        for (int m = 0; m < kStateRows; ++m) {
          const float yv = ys[j * kXs + ti + 16 * m];
          acc[m][0] += yv * z0;
          acc[m][1] += yv * z1;
        }
      }
      const float decay = pw[n];
#pragma unroll
      for (int m = 0; m < kStateRows; ++m)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& s = st[(ti + 16 * m) * kCols + tj + 16 * c];
          s = decay * s + acc[m][c];
        }
    }
  }
  if (pass.state_out != nullptr) {
    __syncthreads();
    float* out = pass.state_out + segment * static_cast<int64_t>(ps.B * ps.H * ps.D * ps.D) + state_base;
    for (int e = threadIdx.x; e < kD * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      const int64_t col = c0 + c;
      if (r < ps.D && col < ps.D) out[r * ps.D + col] = st[r * kCols + c];
    }
  }
}

template <int kD>
constexpr size_t chunk_smem() {
  return sizeof(float) * (2 * kChunk * (kD + 1) + kChunk * kCols + kChunk * (kChunk + 1) + kD * kCols +
                          (kChunk + 1) + 2 * kChunk);
}

// Step 2: per state element of one (batch, head), the scan over segments.
// entering[r] = state before segment r (in processing order: forward, or
// reverse from the last segment); final_out (optional) = state after all.
__global__ void lightning_scan_kernel(float* entering, float* final_out, const float* local, const float* init,
                                      const float* seg_decay, int segments, bool reverse, int64_t B, int64_t H,
                                      int64_t DD) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= DD) return;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t base = (b * H + h) * DD + e, stride = B * H * DD;
  const float full = seg_decay[2 * h], last = seg_decay[2 * h + 1];
  float state = init != nullptr ? init[base] : 0.f;
  for (int step = 0; step < segments; ++step) {
    const int r = reverse ? segments - 1 - step : step;
    entering[r * stride + base] = state;
    state = (r == segments - 1 ? last : full) * state + local[r * stride + base];
  }
  if (final_out != nullptr) final_out[base] = state;
}

// Calls f(kernel, threads, dynamic smem bytes, column tiles) with the chunk kernel for dtype, D,
// whether the passes are state-only and (bf16) whether their rows load as 16-byte vectors.
template <typename F>
void with_chunk_kernel(DType dtype, int64_t D, bool state_only, bool vectors, F&& f) {
  auto with_dim = [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    auto head = [&](auto only, auto vec) {
      constexpr bool kOnly = decltype(only)::value, kVec = decltype(vec)::value;
      f(lightning_mma_kernel<kD, kOnly, kVec>, HeadKernel<kD, kOnly>::kThreads, HeadKernel<kD, kOnly>::kBytes, 1);
    };
    using True = std::true_type;
    using False = std::false_type;
    if (dtype == DType::f32) {
      f(lightning_chunk_kernel<float, kD>, kThreads, chunk_smem<kD>(), static_cast<int>((D + kCols - 1) / kCols));
    } else if (state_only) {
      vectors ? head(True{}, True{}) : head(True{}, False{});
    } else {
      vectors ? head(False{}, True{}) : head(False{}, False{});
    }
  };
  if (D <= 16) with_dim(std::integral_constant<int, 16>{});
  else if (D <= 32) with_dim(std::integral_constant<int, 32>{});
  else if (D <= 64) with_dim(std::integral_constant<int, 64>{});
  else with_dim(std::integral_constant<int, 128>{});
}

// The rows of every pass load as whole 16-byte vectors: D is the kernel's head dim (16, 32, 64 or
// 128; other D are zero-padded up to it) and every tensor is 16-byte aligned.
bool vector_rows(const PassSet& ps, int passes) {
  if (ps.D != 16 && ps.D != 32 && ps.D != 64 && ps.D != 128) return false;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  for (int p = 0; p < passes; ++p)
    if (!aligned(ps.pass[p].x) || !aligned(ps.pass[p].y) || !aligned(ps.pass[p].z)) return false;
  return true;
}

// Launches `passes` passes of ps over ps.segments segments (all state-only or none).
void launch_passes(DType dtype, PassSet& ps, int passes, Stream& s) {
  if (ps.B == 0 || ps.H == 0 || ps.D == 0) return;
  for (int p = 1; p < passes; ++p) LOOM_CHECK(ps.pass[p].state_only == ps.pass[0].state_only);
  with_chunk_kernel(dtype, ps.D, ps.pass[0].state_only, vector_rows(ps, passes),
                    [&](auto kernel, int threads, size_t smem, int tiles) {
    ps.tiles = tiles;
    dim3 grid(static_cast<unsigned>(tiles * passes), static_cast<unsigned>(ps.H),
              static_cast<unsigned>(ps.B * ps.segments));
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<grid, threads, smem, raw(s)>>>(ps);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void launch_scan(float* entering, float* final_out, const float* local, const float* init, const float* seg_decay,
                 const PassSet& ps, bool reverse, Stream& s) {
  const int64_t DD = ps.D * ps.D;
  if (ps.B == 0 || ps.H == 0 || DD == 0) return;
  dim3 grid(static_cast<unsigned>((DD + 255) / 256), static_cast<unsigned>(ps.H), static_cast<unsigned>(ps.B));
  lightning_scan_kernel<<<grid, 256, 0, raw(s)>>>(entering, final_out, local, init, seg_decay, ps.segments, reverse,
                                                  ps.B, ps.H, DD);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void check_tensor(const Tensor& t, const Shape& shape, DType dtype, const Stream& s, const char* op,
                  const char* name) {
  check_device_tensor(t, s, op, name);
  LOOM_CHECK(t.shape() == shape) << op << ": " << name << " shape " << shape_str(t.shape()) << ", expected "
                                 << shape_str(shape);
  LOOM_CHECK(t.dtype() == dtype) << op << ": " << name << " dtype " << t.dtype() << ", expected " << dtype;
}

// ps.segments = count segments of ceil(chunks / count) chunks each.
void set_segments(PassSet& ps, int64_t chunks, int64_t count) {
  ps.seg_len = std::max<int64_t>(1, (chunks + count - 1) / count) * kChunk;
  ps.segments = static_cast<int>(count);
  LOOM_CHECK(ps.H <= 65535 && ps.B * count <= 65535)
      << "lightning: H = " << ps.H << " and B * segments = " << ps.B << " * " << count
      << " must each be <= 65535 (grid limits)";
}

// Segments for `passes` passes of (B, H, D) over T tokens. The blocks of a
// launch all walk about the same number of chunks, so the count is chosen for
// whole waves of the output passes: the fewest segments whose blocks fill at least 95% of the
// waves they take (else the best fill), with segments of at least 8 chunks
// (the state load, store and scan are amortized over them). One segment skips
// the state-only pass and the scan. `given` > 0 takes that count instead (the
// forward's, whose saved states the backward reuses). Segments of `s` count are
// ceil(chunks / s) chunks long (the last one shorter), so the count alone
// fixes every boundary.
void plan_segments(PassSet& ps, int passes, DType dtype, const Stream& s, int64_t given) {
  const int64_t chunks = (ps.T + kChunk - 1) / kChunk;
  if (given > 0) {
    const int64_t per = std::max<int64_t>(1, (chunks + given - 1) / given);
    LOOM_CHECK(given == std::max<int64_t>(1, (chunks + per - 1) / per))
        << "lightning: saved states of " << given << " segments do not fit T = " << ps.T << " (" << chunks
        << " chunks of " << kChunk << " tokens): they come from another sequence";
    set_segments(ps, chunks, given);
    return;
  }
  int sms = 0;
  LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, s.device().index));
  int resident = 1;
  int64_t tiles = 1;
  with_chunk_kernel(dtype, std::max<int64_t>(ps.D, 1), false, true, [&](auto kernel, int threads, size_t smem, int t) {
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    LOOM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem));
    tiles = t;
  });
  const int64_t wave = static_cast<int64_t>(std::max(resident, 1)) * sms;
  const int64_t per_segment = std::max<int64_t>(1, tiles * ps.H * ps.B * passes);
  constexpr int64_t kMinSegment = 8 * kChunk;
  const int64_t most = std::min<int64_t>(std::max<int64_t>(1, ps.T / kMinSegment),
                                         std::max<int64_t>(1, 8 * wave / per_segment));
  int64_t segments = 1;
  double best = 0;
  for (int64_t n = 1; n <= most; ++n) {
    const int64_t blocks = n * per_segment;
    const double fill = static_cast<double>(blocks) / static_cast<double>(((blocks + wave - 1) / wave) * wave);
    if (fill > best + 1e-9) best = fill, segments = n;
    if (fill >= 0.95) break;
  }
  // Segments of ceil(chunks / n) chunks number s = ceil(chunks / that) <= n; those s segments are
  // ceil(chunks / s) chunks long (the same count again).
  const int64_t per = std::max<int64_t>(1, (chunks + segments - 1) / segments);
  set_segments(ps, chunks, std::max<int64_t>(1, (chunks + per - 1) / per));
}

// Checks q, k, v, the decays and the scalars; plans the segments and returns
// on the device the decay powers (H, kChunk + 1): gamma_h^m, then (H, 2):
// gamma_h^seg_len and gamma_h^(length of the last segment).
std::unique_ptr<Storage> check_inputs(PassSet& ps, int passes, const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                                      int64_t block_size, Stream& s, const char* op, int64_t given_segments = 0) {
  check_device_tensor(q, s, op, "q");
  LOOM_CHECK(q.dim() == 4) << op << ": q shape " << shape_str(q.shape()) << " must be (B, T, H, D)";
  LOOM_CHECK(q.dtype() == DType::bf16 || q.dtype() == DType::f32) << op << ": dtype " << q.dtype()
                                                                  << " is not supported (bf16, f32)";
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  LOOM_CHECK(D <= kMaxHeadDim) << op << ": head dim D = " << D << " is above " << kMaxHeadDim
                               << " (CUDA kernel limit)";
  check_tensor(k, q.shape(), q.dtype(), s, op, "k");
  check_tensor(v, q.shape(), q.dtype(), s, op, "v");
  if (initial_state.defined()) check_tensor(initial_state, {B, H, D, D}, DType::f32, s, op, "initial_state");
  LOOM_CHECK(decay_lambdas.defined()) << op << ": decay_lambdas are undefined";
  LOOM_CHECK(decay_lambdas.device().is_cpu()) << op << ": decay_lambdas must be a CPU tensor (host-side schedule), is on "
                                              << decay_lambdas.device();
  LOOM_CHECK(decay_lambdas.dim() == 1 && decay_lambdas.size(0) == H)
      << op << ": decay_lambdas shape " << shape_str(decay_lambdas.shape()) << " must be (H) = " << shape_str({H});
  LOOM_CHECK(is_floating(decay_lambdas.dtype())) << op << ": decay_lambdas must be floating, got "
                                                 << decay_lambdas.dtype();
  std::vector<double> lambdas = decay_lambdas.to(DType::f64).to_vector<double>();
  for (size_t i = 0; i < lambdas.size(); ++i)
    LOOM_CHECK(std::isfinite(lambdas[i]) && lambdas[i] >= 0.0)
        << op << ": decay_lambdas[" << i << "] = " << lambdas[i] << " must be finite and >= 0";
  LOOM_CHECK(std::isfinite(out_scale)) << op << ": out_scale = " << out_scale << " is not finite";
  LOOM_CHECK(block_size >= 0) << op << ": block_size = " << block_size << " must be >= 0";
  ps.B = B, ps.T = T, ps.H = H, ps.D = D;
  plan_segments(ps, passes, q.dtype(), s, given_segments);
  const int64_t last_len = T - (ps.segments - 1) * ps.seg_len;
  // gamma^m = exp(-lambda m) in double, as the CPU twin forms it.
  const size_t table = static_cast<size_t>(std::max<int64_t>(H, 1)) * (kChunk + 1);
  std::vector<float> powers(table + 2 * static_cast<size_t>(std::max<int64_t>(H, 1)));
  for (int64_t hh = 0; hh < H; ++hh) {
    for (int m = 0; m <= kChunk; ++m)
      powers[hh * (kChunk + 1) + m] = static_cast<float>(std::exp(-lambdas[hh] * static_cast<double>(m)));
    powers[table + 2 * hh] = static_cast<float>(std::exp(-lambdas[hh] * static_cast<double>(ps.seg_len)));
    powers[table + 2 * hh + 1] = static_cast<float>(std::exp(-lambdas[hh] * static_cast<double>(last_len)));
  }
  auto device_powers = std::make_unique<Storage>(powers.size() * sizeof(float), q.device(), &s);
  // Pageable source: the copy is staged before the call returns, so `powers` may go.
  LOOM_CUDA_CHECK(cudaMemcpyAsync(device_powers->data(), powers.data(), powers.size() * sizeof(float),
                                  cudaMemcpyHostToDevice, raw(s)));
  ps.powers = static_cast<const float*>(device_powers->data());
  return device_powers;
}

const float* segment_decays(const PassSet& ps) { return ps.powers + std::max<int64_t>(ps.H, 1) * (kChunk + 1); }

// A state-only pass: from zero, writes each segment's local state into `local`.
Pass local_state_pass(const void* y, const void* z, float* local, bool reverse, float update) {
  return Pass{nullptr, nullptr, y, z, nullptr, 0, false, local, reverse, true, 0.f, 0.f, update};
}

}  // namespace

void lightning_forward(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                       int64_t block_size, Stream& s, Tensor* saved_states) {
  const char* op = "lightning_forward";
  PassSet ps{};
  std::unique_ptr<Storage> powers =
      check_inputs(ps, 1, q, k, v, initial_state, decay_lambdas, out_scale, block_size, s, op);
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  check_tensor(out, q.shape(), q.dtype(), s, op, "out");
  check_tensor(final_state, {B, H, D, D}, DType::f32, s, op, "final_state");
  if (saved_states != nullptr) *saved_states = Tensor();
  const float so = static_cast<float>(out_scale);
  const float* s0 = initial_state.defined() ? initial_state.data<float>() : nullptr;
  if (ps.segments == 1) {
    ps.pass[0] = Pass{out.raw_data(), q.raw_data(), k.raw_data(), v.raw_data(), s0, 0, false,
                      final_state.data<float>(), false, false, so, so, 1.f};
    launch_passes(q.dtype(), ps, 1, s);
    return;
  }
  const int64_t state_elems = B * H * D * D;
  const size_t bytes = sizeof(float) * static_cast<size_t>(ps.segments * state_elems);
  Storage local(bytes, q.device(), &s);  // (segments, B, H, D, D)
  // The segments' entering states: a tensor kept for the backward when asked for, else scratch.
  Tensor entering;
  std::unique_ptr<Storage> scratch;
  if (saved_states != nullptr) entering = Tensor::empty({ps.segments, B, H, D, D}, DType::f32, q.device());
  else scratch = std::make_unique<Storage>(bytes, q.device(), &s);
  auto* local_s = static_cast<float*>(local.data());
  float* entering_s = saved_states != nullptr ? entering.data<float>() : static_cast<float*>(scratch->data());
  ps.pass[0] = local_state_pass(k.raw_data(), v.raw_data(), local_s, false, 1.f);
  launch_passes(q.dtype(), ps, 1, s);
  launch_scan(entering_s, final_state.data<float>(), local_s, s0, segment_decays(ps), ps, false, s);
  ps.pass[0] = Pass{out.raw_data(), q.raw_data(), k.raw_data(), v.raw_data(), entering_s, state_elems, false,
                    nullptr, false, false, so, so, 1.f};
  launch_passes(q.dtype(), ps, 1, s);
  if (saved_states != nullptr) *saved_states = std::move(entering);
}

void lightning_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                        const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                        int64_t block_size, Stream& s, const Tensor& saved_states) {
  const char* op = "lightning_backward";
  int64_t given = 0;
  if (saved_states.defined()) {
    check_device_tensor(saved_states, s, op, "saved_states");
    LOOM_CHECK(q.dim() == 4) << op << ": q shape " << shape_str(q.shape()) << " must be (B, T, H, D)";
    const Shape expect{saved_states.dim() == 5 ? saved_states.size(0) : 0, q.size(0), q.size(2), q.size(3),
                       q.size(3)};
    LOOM_CHECK(saved_states.dim() == 5 && saved_states.size(0) >= 2 && saved_states.shape() == expect &&
               saved_states.dtype() == DType::f32)
        << op << ": saved_states " << shape_str(saved_states.shape()) << " " << saved_states.dtype()
        << " must be f32 (segments >= 2, B, H, D, D) from lightning_forward on this q";
    given = saved_states.size(0);
  }
  PassSet ps{};
  std::unique_ptr<Storage> powers =
      check_inputs(ps, 3, q, k, v, initial_state, decay_lambdas, out_scale, block_size, s, op,
                   given);
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  const Shape state_shape{B, H, D, D};
  check_tensor(dq, q.shape(), q.dtype(), s, op, "dq");
  check_tensor(dk, q.shape(), q.dtype(), s, op, "dk");
  check_tensor(dv, q.shape(), q.dtype(), s, op, "dv");
  if (dout.defined()) check_tensor(dout, q.shape(), q.dtype(), s, op, "dout");
  if (dfinal_state.defined()) check_tensor(dfinal_state, state_shape, DType::f32, s, op, "dfinal_state");
  if (dinitial_state.defined()) check_tensor(dinitial_state, state_shape, DType::f32, s, op, "dinitial_state");
  const float so = static_cast<float>(out_scale);
  const void* g = dout.defined() ? dout.raw_data() : nullptr;  // null reads as zeros
  const float* s0 = initial_state.defined() ? initial_state.data<float>() : nullptr;
  const float* gf = dfinal_state.defined() ? dfinal_state.data<float>() : nullptr;
  float* ds0 = dinitial_state.defined() ? dinitial_state.data<float>() : nullptr;
  if (ps.segments == 1) {
    ps.pass[0] = Pass{dq.raw_data(), g, v.raw_data(), k.raw_data(), s0, 0, true, nullptr, false, false, so, so, 1.f};
    ps.pass[1] = Pass{dv.raw_data(), k.raw_data(), q.raw_data(), g, gf, 0, false, ds0, true, false, so, 1.f, so};
    ps.pass[2] = Pass{dk.raw_data(), v.raw_data(), g, q.raw_data(), gf, 0, true, nullptr, true, false, so, 1.f, so};
    launch_passes(q.dtype(), ps, 3, s);
    return;
  }
  const int64_t state_elems = B * H * D * D;
  const size_t bytes = sizeof(float) * static_cast<size_t>(ps.segments * state_elems);
  // (segments, B, H, D, D) each: entering S (forward order; the forward's when saved, else recomputed from
  // its local states), local and entering G (reverse order).
  Storage local_g(bytes, q.device(), &s), entering_g(bytes, q.device(), &s);
  std::unique_ptr<Storage> local_s, entering_s;
  const float* es = given > 0 ? saved_states.data<float>() : nullptr;
  auto* lg = static_cast<float*>(local_g.data());
  auto* eg = static_cast<float*>(entering_g.data());
  int passes = 0;
  if (es == nullptr) {
    local_s = std::make_unique<Storage>(bytes, q.device(), &s);
    entering_s = std::make_unique<Storage>(bytes, q.device(), &s);
    ps.pass[passes++] = local_state_pass(k.raw_data(), v.raw_data(), static_cast<float*>(local_s->data()), false, 1.f);
  }
  ps.pass[passes++] = local_state_pass(q.raw_data(), g, lg, true, so);
  launch_passes(q.dtype(), ps, passes, s);
  if (es == nullptr) {
    launch_scan(static_cast<float*>(entering_s->data()), nullptr, static_cast<const float*>(local_s->data()), s0,
                segment_decays(ps), ps, false, s);
    es = static_cast<const float*>(entering_s->data());
  }
  launch_scan(eg, ds0, lg, gf, segment_decays(ps), ps, true, s);
  ps.pass[0] = Pass{dq.raw_data(), g, v.raw_data(), k.raw_data(), es, state_elems, true, nullptr, false, false, so, so,
                    1.f};
  ps.pass[1] = Pass{dv.raw_data(), k.raw_data(), q.raw_data(), g, eg, state_elems, false, nullptr, true, false, so,
                    1.f, so};
  ps.pass[2] = Pass{dk.raw_data(), v.raw_data(), g, q.raw_data(), eg, state_elems, true, nullptr, true, false, so, 1.f,
                    so};
  launch_passes(q.dtype(), ps, 3, s);
}

}  // namespace loom::cuda
