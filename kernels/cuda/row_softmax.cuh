// Row-wise softmax machinery shared by softmax.cu and cross_entropy.cu: a row
// is handled by one warp (rows up to kWarpCols wide, 8 rows per block) or by
// one block (longer rows); each thread keeps a running (max, sum) over its
// 16-byte vectors — one exponential per element, the sum rescaled only when a
// vector raises the max — merged across the group at the end.
#pragma once

#include <type_traits>

#include "kernels/cuda/kernel_utils.cuh"

namespace loom::cuda::rowwise {

constexpr int kThreads = 256;  // threads per block in the one-warp-per-row layout
constexpr int64_t kWarpCols = 2048;  // rows up to this width go one per warp

// Folds N values into a running softmax state.
template <int N>
__device__ __forceinline__ void add_values(OnlineSoftmax& s, const float (&f)[N]) {
  float pm = f[0];
#pragma unroll
  for (int j = 1; j < N; ++j) pm = fmaxf(pm, f[j]);
  if (pm == -INFINITY) return;  // nothing but -inf: contributes 0
  if (pm > s.max) {
    s.sum *= __expf(s.max - pm);
    s.max = pm;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) s.sum += __expf(f[j] - s.max);
}

// The row, lane and group size of this thread.
template <bool kWarp>
struct RowSlot {
  int64_t row;
  int lane, group;
  __device__ RowSlot() {
    if constexpr (kWarp) {
      row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
      lane = threadIdx.x % 32;
      group = 32;
    } else {
      row = blockIdx.x;
      lane = threadIdx.x;
      group = blockDim.x;
    }
  }
};

template <bool kWarp>
__device__ __forceinline__ OnlineSoftmax group_merge(OnlineSoftmax s) {
  if constexpr (kWarp) return warp_merge(s);
  else return block_merge(s);
}
template <bool kWarp, typename V>
__device__ __forceinline__ V group_sum(V v) {
  if constexpr (kWarp) return warp_sum(v);
  else return block_reduce(v, SumOp{}, V(0));
}

// Loads the N = kVec<T> (vectorized) or 1 elements at i as floats.
template <typename T, bool kVectorized>
struct RowAccess {
  static constexpr int N = kVectorized ? kVec<T> : 1;
  __device__ __forceinline__ static void load(float (&f)[N], const T* p, int64_t i) {
    if constexpr (kVectorized) {
      Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(p + i);
#pragma unroll
      for (int j = 0; j < N; ++j) f[j] = to_float(v.v[j]);
    } else {
      f[0] = to_float(p[i]);
    }
  }
  __device__ __forceinline__ static void store(T* p, int64_t i, const float (&f)[N]) {
    if constexpr (kVectorized) {
      Vec16<T> v;
#pragma unroll
      for (int j = 0; j < N; ++j) v.v[j] = from_float<T>(f[j]);
      *reinterpret_cast<Vec16<T>*>(p + i) = v;
    } else {
      p[i] = from_float<T>(f[0]);
    }
  }
};

// The merged (max, sum) of row `xr` over the group.
template <typename T, bool kWarp, bool kVectorized>
__device__ __forceinline__ OnlineSoftmax row_statistics(const T* xr, int64_t cols, int lane, int group) {
  using A = RowAccess<T, kVectorized>;
  OnlineSoftmax st;
  for (int64_t i = lane * A::N; i < cols; i += group * A::N) {
    float f[A::N];
    A::load(f, xr, i);
    add_values(st, f);
  }
  return group_merge<kWarp>(st);
}

// Calls fn(warp, vectorized) (std::integral_constant tags) and launches with
// the matching grid: one warp per row up to kWarpCols, else one block per row.
template <typename T, typename Fn>
void with_row_config(int64_t rows, int64_t cols, std::initializer_list<const void*> pointers, Fn&& fn) {
  const bool warp = cols <= kWarpCols;
  const bool vec = vectorizable<T>(cols, pointers);
  const int threads = warp ? kThreads : (cols <= 8192 ? 256 : 512);
  const int64_t blocks = warp ? (rows + kThreads / 32 - 1) / (kThreads / 32) : rows;
  using True = std::true_type;
  using False = std::false_type;
  if (warp && vec) fn(True{}, True{}, blocks, threads);
  else if (warp) fn(True{}, False{}, blocks, threads);
  else if (vec) fn(False{}, True{}, blocks, threads);
  else fn(False{}, False{}, blocks, threads);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::cuda::rowwise
