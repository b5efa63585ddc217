// RoPE on CUDA (see rope.h): one thread per (token, pair i) computes cos/sin
// once and rotates that pair in every head; consecutive threads take
// consecutive i, so each head's loads and stores are coalesced.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rope.h"

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T, typename P>
__global__ void rope_kernel(T* __restrict__ y, const T* __restrict__ x, const P* __restrict__ positions,
                            bool per_batch, int64_t B, int64_t T_, int64_t H, int64_t D, double log_theta,
                            float sign) {
  const int64_t half = D / 2;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * T_ * half) return;
  const int64_t bt = idx / half, i = idx % half;
  const double pos = static_cast<double>(positions[per_batch ? bt : bt % T_]);
  // angle = pos * theta^(-2i/D), reduced to [-pi, pi] in double before the fp32 sincos.
  double angle = pos * exp(-2.0 * static_cast<double>(i) / static_cast<double>(D) * log_theta);
  angle = remainder(angle, 6.283185307179586);
  float c, s;
  sincosf(static_cast<float>(angle), &s, &c);
  s *= sign;
  for (int64_t h = 0; h < H; ++h) {
    const int64_t base = (bt * H + h) * D;
    const float a = to_float(x[base + i]), b = to_float(x[base + i + half]);
    y[base + i] = from_float<T>(a * c - b * s);
    y[base + i + half] = from_float<T>(b * c + a * s);
  }
}

void rope_apply(Tensor& y, const Tensor& x, const Tensor& positions, double theta, float sign, Stream& s,
                const char* op) {
  check_device_tensor(x, s, op, "x");
  check_device_tensor(y, s, op, "y");
  check_device_tensor(positions, s, op, "positions");
  LOOM_CHECK(x.dim() == 4 && y.shape() == x.shape() && y.dtype() == x.dtype())
      << op << ": x " << shape_str(x.shape()) << " must be (B, T, H, D) and y " << shape_str(y.shape())
      << " the same";
  const int64_t B = x.size(0), T_ = x.size(1), H = x.size(2), D = x.size(3);
  LOOM_CHECK(D % 2 == 0) << op << ": head dim D = " << D << " must be even";
  LOOM_CHECK(positions.dtype() == DType::i64 || positions.dtype() == DType::i32)
      << op << ": positions must be i64 or i32, got " << positions.dtype();
  const bool per_token = positions.dim() == 1 && positions.size(0) == T_;
  const bool per_batch = positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T_;
  LOOM_CHECK(per_token || per_batch) << op << ": positions " << shape_str(positions.shape()) << " must be (T) or (B, T) for x "
                                     << shape_str(x.shape());
  const int64_t n = B * T_ * (D / 2);
  if (n == 0 || H == 0) return;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  LOOM_DISPATCH_CUDA_FLOAT(x.dtype(), T, [&] {
    if (positions.dtype() == DType::i64)
      rope_kernel<T, int64_t><<<blocks, kThreads, 0, raw(s)>>>(
          static_cast<T*>(y.raw_data()), static_cast<const T*>(x.raw_data()), positions.data<int64_t>(), per_batch, B,
          T_, H, D, std::log(theta), sign);
    else
      rope_kernel<T, int32_t><<<blocks, kThreads, 0, raw(s)>>>(
          static_cast<T*>(y.raw_data()), static_cast<const T*>(x.raw_data()), positions.data<int32_t>(), per_batch, B,
          T_, H, D, std::log(theta), sign);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace

void rope_forward(Tensor& y, const Tensor& x, const Tensor& positions, double theta, Stream& s) {
  rope_apply(y, x, positions, theta, 1.f, s, "rope_forward");
}

void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& positions, double theta, Stream& s) {
  rope_apply(dx, dy, positions, theta, -1.f, s, "rope_backward");
}

}  // namespace loom::cuda
