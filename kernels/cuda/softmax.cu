// Softmax on CUDA (see softmax.h). Rows go one per warp or
// one per block (row_softmax.cuh); the statistics pass keeps a running
// (max, sum) per thread, and the output pass re-reads the row (from L2 for
// all but the longest rows). Output exponentials use the
// accurate expf so that fp32 results track the CPU twin to an ulp or two.
#include <cmath>
#include <type_traits>

#include "kernels/cuda/row_softmax.cuh"
#include "kernels/cuda/softmax.h"

namespace loom::cuda {

namespace {

using namespace rowwise;

template <typename T, bool kWarp, bool kVectorized>
__global__ void softmax_forward_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t rows, int64_t cols) {
  using A = RowAccess<T, kVectorized>;
  const RowSlot<kWarp> slot;
  if (slot.row >= rows) return;
  const T* xr = x + slot.row * cols;
  T* yr = y + slot.row * cols;
  const OnlineSoftmax st = row_statistics<T, kWarp, kVectorized>(xr, cols, slot.lane, slot.group);
  // A row without a finite max subtracts 0 (all -inf: 0 / 0 = NaN, as on the CPU).
  const float shift = isfinite(st.max) ? st.max : 0.f;
  const float inv = 1.f / st.sum;
  for (int64_t i = slot.lane * A::N; i < cols; i += slot.group * A::N) {
    float f[A::N];
    A::load(f, xr, i);
#pragma unroll
    for (int j = 0; j < A::N; ++j) f[j] = expf(f[j] - shift) * inv;
    A::store(yr, i, f);
  }
}

template <typename T, bool kWarp, bool kVectorized>
__global__ void softmax_backward_kernel(T* __restrict__ dx, const T* __restrict__ dy, const T* __restrict__ y,
                                        int64_t rows, int64_t cols) {
  using A = RowAccess<T, kVectorized>;
  const RowSlot<kWarp> slot;
  if (slot.row >= rows) return;
  const int64_t base = slot.row * cols;
  double dot = 0.0;  // double: dy - dot cancels
  for (int64_t i = slot.lane * A::N; i < cols; i += slot.group * A::N) {
    float fy[A::N], fdy[A::N];
    A::load(fy, y + base, i);
    A::load(fdy, dy + base, i);
    float part = 0.f;
#pragma unroll
    for (int j = 0; j < A::N; ++j) part += fdy[j] * fy[j];
    dot += part;
  }
  const float d = static_cast<float>(group_sum<kWarp>(dot));
  for (int64_t i = slot.lane * A::N; i < cols; i += slot.group * A::N) {
    float fy[A::N], fdy[A::N];
    A::load(fy, y + base, i);
    A::load(fdy, dy + base, i);
#pragma unroll
    for (int j = 0; j < A::N; ++j) fy[j] = fy[j] * (fdy[j] - d);
    A::store(dx + base, i, fy);
  }
}

void check_like(const Tensor& t, const Tensor& like, const Stream& s, const char* op, const char* name) {
  check_device_tensor(t, s, op, name);
  LOOM_CHECK(t.shape() == like.shape() && t.dtype() == like.dtype())
      << op << ": " << name << " " << shape_str(t.shape()) << " " << t.dtype() << " differs from "
      << shape_str(like.shape()) << " " << like.dtype();
}

void rows_cols(const Tensor& x, const char* op, int64_t& rows, int64_t& cols) {
  LOOM_CHECK(x.dim() >= 1) << op << ": x must have at least one dim, got " << shape_str(x.shape());
  cols = x.size(-1);
  rows = cols == 0 ? 0 : x.numel() / cols;
}

}  // namespace

void softmax_forward(Tensor& y, const Tensor& x, Stream& s) {
  check_device_tensor(x, s, "softmax_forward", "x");
  check_like(y, x, s, "softmax_forward", "y");
  int64_t rows, cols;
  rows_cols(x, "softmax_forward", rows, cols);
  if (rows == 0) return;
  LOOM_DISPATCH_CUDA_FLOAT(x.dtype(), T, [&] {
    T* yp = static_cast<T*>(y.raw_data());
    const T* xp = static_cast<const T*>(x.raw_data());
    with_row_config<T>(rows, cols, {yp, xp}, [&](auto warp, auto vec, int64_t blocks, int threads) {
      softmax_forward_kernel<T, decltype(warp)::value, decltype(vec)::value><<<blocks, threads, 0, raw(s)>>>(
          yp, xp, rows, cols);
    });
  });
}

void softmax_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s) {
  check_device_tensor(y, s, "softmax_backward", "y");
  check_like(dy, y, s, "softmax_backward", "dy");
  check_like(dx, y, s, "softmax_backward", "dx");
  int64_t rows, cols;
  rows_cols(y, "softmax_backward", rows, cols);
  if (rows == 0) return;
  LOOM_DISPATCH_CUDA_FLOAT(y.dtype(), T, [&] {
    T* dxp = static_cast<T*>(dx.raw_data());
    const T* dyp = static_cast<const T*>(dy.raw_data());
    const T* yp = static_cast<const T*>(y.raw_data());
    with_row_config<T>(rows, cols, {dxp, dyp, yp}, [&](auto warp, auto vec, int64_t blocks, int threads) {
      softmax_backward_kernel<T, decltype(warp)::value, decltype(vec)::value><<<blocks, threads, 0, raw(s)>>>(
          dxp, dyp, yp, rows, cols);
    });
  });
}

}  // namespace loom::cuda
