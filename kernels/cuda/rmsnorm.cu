// RMSNorm forward/backward on CUDA (see rmsnorm.h). Statistics are fp32
// whatever the storage dtype; the row sum of squares and the backward's row
// dot product are block reductions.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rmsnorm.h"

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerChunk = 64;  // rows summed by one block for dw

template <typename T, bool kVectorized>
__global__ void rmsnorm_forward_kernel(T* __restrict__ y, float* __restrict__ rstd, const T* __restrict__ x,
                                       const T* __restrict__ w, int64_t cols, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float sum = 0.f;
  if constexpr (kVectorized) {
    for (int64_t i = threadIdx.x * kVec<T>; i < cols; i += blockDim.x * kVec<T>) {
      Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(xr + i);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) sum += to_float(v.v[j]) * to_float(v.v[j]);
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) sum += to_float(xr[i]) * to_float(xr[i]);
  }
  sum = block_sum(sum);
  const float r = rsqrtf(sum / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  if constexpr (kVectorized) {
    for (int64_t i = threadIdx.x * kVec<T>; i < cols; i += blockDim.x * kVec<T>) {
      Vec16<T> xv = *reinterpret_cast<const Vec16<T>*>(xr + i);
      Vec16<T> wv = *reinterpret_cast<const Vec16<T>*>(w + i);
      Vec16<T> out;
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) out.v[j] = from_float<T>(to_float(xv.v[j]) * r * to_float(wv.v[j]));
      *reinterpret_cast<Vec16<T>*>(yr + i) = out;
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = from_float<T>(to_float(xr[i]) * r * to_float(w[i]));
  }
}

// dx_i = r w_i dy_i - x_i r^3 / C * sum_j dy_j w_j x_j
template <typename T>
__global__ void rmsnorm_backward_dx_kernel(T* __restrict__ dx, const T* __restrict__ dy, const T* __restrict__ x,
                                           const T* __restrict__ w, const float* __restrict__ rstd, int64_t cols) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  T* dxr = dx + row * cols;
  const float r = rstd[row];
  float dot = 0.f;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) dot += to_float(dyr[i]) * to_float(w[i]) * to_float(xr[i]);
  dot = block_sum(dot);
  const float coef = r * r * r * dot / static_cast<float>(cols);
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
    dxr[i] = from_float<T>(r * to_float(w[i]) * to_float(dyr[i]) - to_float(xr[i]) * coef);
}

// partial[chunk, j] = sum over the chunk's rows of dy_j x_j r (fixed order: deterministic).
template <typename T>
__global__ void rmsnorm_backward_dw_partial_kernel(float* __restrict__ partial, const T* __restrict__ dy,
                                                   const T* __restrict__ x, const float* __restrict__ rstd,
                                                   int64_t rows, int64_t cols) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  const int64_t begin = blockIdx.y * static_cast<int64_t>(kRowsPerChunk);
  const int64_t end = min(rows, begin + kRowsPerChunk);
  float sum = 0.f;
  for (int64_t r = begin; r < end; ++r) sum += to_float(dy[r * cols + col]) * to_float(x[r * cols + col]) * rstd[r];
  partial[blockIdx.y * cols + col] = sum;
}

template <typename W>
__global__ void sum_chunks_kernel(W* __restrict__ dw, const float* __restrict__ partial, int64_t chunks, int64_t cols) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  float sum = 0.f;
  for (int64_t c = 0; c < chunks; ++c) sum += partial[c * cols + col];
  dw[col] = from_float<W>(sum);
}

void check_rows(const Tensor& x, const Tensor& w, const char* op, int64_t& rows, int64_t& cols) {
  LOOM_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1))
      << op << ": weight " << shape_str(w.shape()) << " does not match x " << shape_str(x.shape());
  LOOM_CHECK(w.dtype() == x.dtype()) << op << ": weight dtype " << w.dtype() << " differs from x " << x.dtype();
  cols = x.size(-1);
  rows = cols == 0 ? 0 : x.numel() / cols;
}

}  // namespace

void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps, Stream& s) {
  for (auto [t, name] : {std::pair{&y, "y"}, {&rstd, "rstd"}}) check_device_tensor(*t, s, "rmsnorm_forward", name);
  check_device_tensor(x, s, "rmsnorm_forward", "x");
  check_device_tensor(w, s, "rmsnorm_forward", "w");
  int64_t rows, cols;
  check_rows(x, w, "rmsnorm_forward", rows, cols);
  LOOM_CHECK(y.shape() == x.shape() && y.dtype() == x.dtype()) << "rmsnorm_forward: y " << shape_str(y.shape())
                                                               << " " << y.dtype() << " for x " << shape_str(x.shape());
  LOOM_CHECK(rstd.numel() == rows && rstd.dtype() == DType::f32) << "rmsnorm_forward: rstd must be f32 with " << rows
                                                                 << " entries, is " << shape_str(rstd.shape());
  if (rows == 0) return;
  LOOM_DISPATCH_CUDA_FLOAT(x.dtype(), T, [&] {
    const T* xp = static_cast<const T*>(x.raw_data());
    const T* wp = static_cast<const T*>(w.raw_data());
    T* yp = static_cast<T*>(y.raw_data());
    if (vectorizable<T>(cols, {xp, wp, yp}))
      rmsnorm_forward_kernel<T, true><<<rows, kThreads, 0, raw(s)>>>(yp, rstd.data<float>(), xp, wp, cols,
                                                                    static_cast<float>(eps));
    else
      rmsnorm_forward_kernel<T, false><<<rows, kThreads, 0, raw(s)>>>(yp, rstd.data<float>(), xp, wp, cols,
                                                                     static_cast<float>(eps));
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Stream& s) {
  for (auto [t, name] : {std::pair{&dx, "dx"}, {&dw, "dw"}}) check_device_tensor(*t, s, "rmsnorm_backward", name);
  for (auto [t, name] : {std::pair{&dy, "dy"}, {&x, "x"}, {&w, "w"}, {&rstd, "rstd"}})
    check_device_tensor(*t, s, "rmsnorm_backward", name);
  int64_t rows, cols;
  check_rows(x, w, "rmsnorm_backward", rows, cols);
  LOOM_CHECK(dy.shape() == x.shape() && dx.shape() == x.shape() && dy.dtype() == x.dtype() && dx.dtype() == x.dtype())
      << "rmsnorm_backward: dx " << shape_str(dx.shape()) << ", dy " << shape_str(dy.shape()) << " for x "
      << shape_str(x.shape());
  LOOM_CHECK(dw.numel() == cols && (dw.dtype() == DType::f32 || dw.dtype() == w.dtype()))
      << "rmsnorm_backward: dw " << shape_str(dw.shape()) << " " << dw.dtype();
  LOOM_CHECK(rstd.numel() == rows && rstd.dtype() == DType::f32) << "rmsnorm_backward: rstd " << shape_str(rstd.shape());
  if (cols == 0) return;
  const int64_t chunks = std::max<int64_t>(1, (rows + kRowsPerChunk - 1) / kRowsPerChunk);
  // Partial sums on the same stream, allocated and freed on it.
  Storage partial(static_cast<size_t>(chunks * cols) * sizeof(float), x.device(), &s);
  LOOM_DISPATCH_CUDA_FLOAT(x.dtype(), T, [&] {
    const T* xp = static_cast<const T*>(x.raw_data());
    const T* dyp = static_cast<const T*>(dy.raw_data());
    if (rows > 0) {
      rmsnorm_backward_dx_kernel<T><<<rows, kThreads, 0, raw(s)>>>(static_cast<T*>(dx.raw_data()), dyp, xp,
                                                                   static_cast<const T*>(w.raw_data()),
                                                                   rstd.data<float>(), cols);
      LOOM_CUDA_CHECK(cudaGetLastError());
    } else {
      LOOM_CUDA_CHECK(cudaMemsetAsync(partial.data(), 0, partial.nbytes(), raw(s)));
    }
    dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(rows > 0 ? chunks : 0));
    if (rows > 0) {
      rmsnorm_backward_dw_partial_kernel<T><<<grid, kThreads, 0, raw(s)>>>(static_cast<float*>(partial.data()), dyp, xp,
                                                                          rstd.data<float>(), rows, cols);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
    LOOM_DISPATCH_CUDA_FLOAT(dw.dtype(), W, [&] {
      sum_chunks_kernel<W><<<(cols + kThreads - 1) / kThreads, kThreads, 0, raw(s)>>>(
          static_cast<W*>(dw.raw_data()), static_cast<const float*>(partial.data()), chunks, cols);
      LOOM_CUDA_CHECK(cudaGetLastError());
    });
  });
}

}  // namespace loom::cuda
