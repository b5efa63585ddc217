// Lightning attention on CUDA cores, fp32 math (see lightning.h). One kernel
// runs every pass: it walks the chunks of 64 tokens of one (batch, head) in
// order (or in reverse), keeping a (D, 32) column tile of a D x D state in
// shared memory, so a head's state is split over D/32 thread blocks and
// B = 1, H = 16, D = 128 gives 64 blocks forward and 192 backward. Per chunk
// (x, y, z are three of q, k, v, dout; n <= 64 tokens; p[m] = gamma^m):
//   A[i][j] = intra * p[|i-j|] (x_i . y_j) on the causal side (j <= i forward, j >= i reverse)
//   out_i   = sum_j A[i][j] z_j + w_inter[i] * x_i St           (St: the state tile)
//   St      = p[n] St + sum_j w_update[j] y_j^T z_j
// with, forward, w_inter[i] = inter * p[i+1], w_update[j] = update * p[n-1-j],
// and reverse w_inter[i] = inter * p[n-1-i], w_update[j] = update * p[j+1].
// The passes (kernels/cpu/lightning.cpp has the algebra):
//   forward  out = o:  x q, y k, z v,  St = S     (from S0),    writes S_final
//   dq     forward:    x do, y v, z k, St = S^T   (from S0^T)
//   dv     reverse:    x k, y q, z do, St = G     (from dS_final), writes dS_initial
//   dk     reverse:    x v, y do, z q, St = G^T   (from dS_final^T)
// (dq, dk, dv are one launch). A is recomputed by every column tile of a head:
// the price of spreading one head over several blocks. Each output element is
// written by one thread in a fixed order (deterministic, no atomics).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/lightning.h"

#include <cmath>
#include <memory>
#include <vector>

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 64;  // tokens per chunk
constexpr int kCols = 32;   // state columns per block
constexpr int kMaxHeadDim = 128;

struct Pass {
  void* out;                 // (B, T, H, D)
  const void* x;             // (B, T, H, D); x, y, z null = zeros
  const void* y;
  const void* z;
  const float* state_in;     // (B, H, D, D) or null (zeros)
  bool transpose_in;         // tile column c, row r <- state_in[c][r]
  float* state_out;          // (B, H, D, D) or null
  bool reverse;
  float intra, inter, update;
};

struct PassSet {
  Pass pass[3];
  int tiles;               // column tiles per pass (blockIdx.x = pass * tiles + tile)
  const float* powers;     // (H, kChunk + 1): gamma_h^m
  int64_t B, T, H, D;
};

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
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;  // this thread's rows ti + 16 r, columns tj + 16 c
  const T* x = static_cast<const T*>(pass.x);
  const T* y = static_cast<const T*>(pass.y);
  const T* z = static_cast<const T*>(pass.z);
  const int64_t state_base = (b * ps.H + h) * ps.D * ps.D;

  for (int m = threadIdx.x; m <= kChunk; m += kThreads) pw[m] = ps.powers[h * (kChunk + 1) + m];
  for (int e = threadIdx.x; e < kD * kCols; e += kThreads) {
    const int r = e / kCols, c = e % kCols;
    const int64_t col = c0 + c;
    float value = 0.f;
    if (pass.state_in != nullptr && r < ps.D && col < ps.D)
      value = pass.state_in[state_base + (pass.transpose_in ? col * ps.D + r : r * ps.D + col)];
    st[r * kCols + c] = value;
  }

  const int64_t chunks = (ps.T + kChunk - 1) / kChunk;
  for (int64_t step = 0; step < chunks; ++step) {
    const int64_t chunk = pass.reverse ? chunks - 1 - step : step;
    const int64_t t0 = chunk * kChunk;
    const int n = static_cast<int>(ps.T - t0 < kChunk ? ps.T - t0 : kChunk);
    __syncthreads();  // previous chunk's tiles are consumed
    load_chunk<T>(xs, kXs, kD, x, ps, b, h, t0, n, 0);
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
    {
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
    {
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
    for (int e = threadIdx.x; e < kD * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      const int64_t col = c0 + c;
      if (r < ps.D && col < ps.D) pass.state_out[state_base + r * ps.D + col] = st[r * kCols + c];
    }
  }
}

template <int kD>
constexpr size_t chunk_smem() {
  return sizeof(float) * (2 * kChunk * (kD + 1) + kChunk * kCols + kChunk * (kChunk + 1) + kD * kCols +
                          (kChunk + 1) + 2 * kChunk);
}

void launch_passes(DType dtype, PassSet& ps, int passes, Stream& s) {
  if (ps.B == 0 || ps.H == 0) return;
  ps.tiles = static_cast<int>((ps.D + kCols - 1) / kCols);
  if (ps.tiles == 0) return;
  dim3 grid(static_cast<unsigned>(ps.tiles * passes), static_cast<unsigned>(ps.H), static_cast<unsigned>(ps.B));
  auto launch = [&](auto tag, auto kd) {
    using T = decltype(tag);
    constexpr int kD = decltype(kd)::value;
    auto kernel = lightning_chunk_kernel<T, kD>;
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(chunk_smem<kD>())));
    kernel<<<grid, kThreads, chunk_smem<kD>(), raw(s)>>>(ps);
    LOOM_CUDA_CHECK(cudaGetLastError());
  };
  auto with_dim = [&](auto tag) {
    if (ps.D <= 16) launch(tag, std::integral_constant<int, 16>{});
    else if (ps.D <= 32) launch(tag, std::integral_constant<int, 32>{});
    else if (ps.D <= 64) launch(tag, std::integral_constant<int, 64>{});
    else launch(tag, std::integral_constant<int, 128>{});
  };
  if (dtype == DType::f32) with_dim(float{});
  else with_dim(__nv_bfloat16{});
}

void check_tensor(const Tensor& t, const Shape& shape, DType dtype, const Stream& s, const char* op,
                  const char* name) {
  check_device_tensor(t, s, op, name);
  LOOM_CHECK(t.shape() == shape) << op << ": " << name << " shape " << shape_str(t.shape()) << ", expected "
                                 << shape_str(shape);
  LOOM_CHECK(t.dtype() == dtype) << op << ": " << name << " dtype " << t.dtype() << ", expected " << dtype;
}

// Checks q, k, v, the decays and the scalars; returns the decay powers (H, kChunk + 1) on the device.
std::unique_ptr<Storage> check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& initial_state,
                     const Tensor& decay_lambdas, double out_scale, int64_t block_size, Stream& s, const char* op) {
  check_device_tensor(q, s, op, "q");
  LOOM_CHECK(q.dim() == 4) << op << ": q shape " << shape_str(q.shape()) << " must be (B, T, H, D)";
  LOOM_CHECK(q.dtype() == DType::bf16 || q.dtype() == DType::f32) << op << ": dtype " << q.dtype()
                                                                  << " is not supported (bf16, f32)";
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
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
  // gamma^m = exp(-lambda m) in double, as the CPU twin forms it.
  std::vector<float> powers(static_cast<size_t>(std::max<int64_t>(H, 1)) * (kChunk + 1));
  for (int64_t hh = 0; hh < H; ++hh)
    for (int m = 0; m <= kChunk; ++m)
      powers[hh * (kChunk + 1) + m] = static_cast<float>(std::exp(-lambdas[hh] * static_cast<double>(m)));
  auto device_powers = std::make_unique<Storage>(powers.size() * sizeof(float), q.device(), &s);
  // Pageable source: the copy is staged before the call returns, so `powers` may go.
  LOOM_CUDA_CHECK(cudaMemcpyAsync(device_powers->data(), powers.data(), powers.size() * sizeof(float),
                                  cudaMemcpyHostToDevice, raw(s)));
  return device_powers;
}

}  // namespace

void lightning_forward(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                       int64_t block_size, Stream& s) {
  const char* op = "lightning_forward";
  std::unique_ptr<Storage> powers = check_inputs(q, k, v, initial_state, decay_lambdas, out_scale, block_size, s, op);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  check_tensor(out, q.shape(), q.dtype(), s, op, "out");
  check_tensor(final_state, {B, H, D, D}, DType::f32, s, op, "final_state");
  const float so = static_cast<float>(out_scale);
  PassSet ps{};
  ps.powers = static_cast<const float*>(powers->data());
  ps.B = B, ps.T = T, ps.H = H, ps.D = D;
  ps.pass[0] = Pass{out.raw_data(), q.raw_data(), k.raw_data(), v.raw_data(),
                    initial_state.defined() ? initial_state.data<float>() : nullptr, false,
                    final_state.data<float>(), false, so, so, 1.f};
  launch_passes(q.dtype(), ps, 1, s);
}

void lightning_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                        const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                        int64_t block_size, Stream& s) {
  const char* op = "lightning_backward";
  std::unique_ptr<Storage> powers = check_inputs(q, k, v, initial_state, decay_lambdas, out_scale, block_size, s, op);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
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
  PassSet ps{};
  ps.powers = static_cast<const float*>(powers->data());
  ps.B = B, ps.T = T, ps.H = H, ps.D = D;
  ps.pass[0] = Pass{dq.raw_data(), g, v.raw_data(), k.raw_data(), s0, true, nullptr, false, so, so, 1.f};
  ps.pass[1] = Pass{dv.raw_data(), k.raw_data(), q.raw_data(), g, gf, false,
                    dinitial_state.defined() ? dinitial_state.data<float>() : nullptr, true, so, 1.f, so};
  ps.pass[2] = Pass{dk.raw_data(), v.raw_data(), g, q.raw_data(), gf, true, nullptr, true, so, 1.f, so};
  launch_passes(q.dtype(), ps, 3, s);
}

}  // namespace loom::cuda
