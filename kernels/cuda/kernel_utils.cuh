// Device helpers shared by the elementwise, reduction, softmax, loss and
// optimizer kernels (beyond common.cuh): packed vector access for any element
// type, conversions that round exactly like the host's Tensor::copy_, block
// reductions in float and double (sum and max), the online-softmax state, and
// dispatch over every floating dtype (f64 included) or every dtype.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace loom::cuda {

constexpr int kMaxDims = 8;  // dims of a strided operand after coalescing

template <typename T>
constexpr bool kIsHalf = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// Arithmetic type for element math: double for f64, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// N elements of T loaded/stored as whole 16-byte (or smaller) vectors; the
// pointer must be aligned to alignof(Pack).
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
inline bool pack_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, N>) == 0;
}

// Element conversion with the host's rounding (framework/tensor.cpp): 16-bit
// floats go through float, everything else through double; float -> 16-bit
// rounds to nearest even.
template <typename D, typename S>
__device__ __forceinline__ D convert(S v) {
  if constexpr (std::is_same_v<D, S>) {
    return v;
  } else if constexpr (kIsHalf<S>) {
    return convert<D>(to_float(v));
  } else if constexpr (kIsHalf<D>) {
    return from_float<D>(static_cast<float>(static_cast<double>(v)));
  } else {
    return static_cast<D>(static_cast<double>(v));
  }
}

// Math type of an element (float for 16-bit and f32, else the type itself).
template <typename T>
__device__ __forceinline__ acc_t<T> load_acc(T v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return to_float(v);
}
template <typename T>
__device__ __forceinline__ T store_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return from_float<T>(v);
}

// IEEE operations rounded one by one (never contracted into a fused
// multiply-add), for kernels that must reproduce the CPU twin's arithmetic.
template <typename C>
__device__ __forceinline__ C mul_rn(C a, C b) {
  if constexpr (std::is_same_v<C, double>) return __dmul_rn(a, b);
  else return __fmul_rn(a, b);
}
template <typename C>
__device__ __forceinline__ C add_rn(C a, C b) {
  if constexpr (std::is_same_v<C, double>) return __dadd_rn(a, b);
  else return __fadd_rn(a, b);
}
template <typename C>
__device__ __forceinline__ C sub_rn(C a, C b) {
  if constexpr (std::is_same_v<C, double>) return __dsub_rn(a, b);
  else return __fsub_rn(a, b);
}
template <typename C>
__device__ __forceinline__ C div_rn(C a, C b) {
  if constexpr (std::is_same_v<C, double>) return __ddiv_rn(a, b);
  else return __fdiv_rn(a, b);
}
template <typename C>
__device__ __forceinline__ C sqrt_rn(C a) {
  if constexpr (std::is_same_v<C, double>) return __dsqrt_rn(a);
  else return __fsqrt_rn(a);
}

// Reduction over the block with a binary op whose identity is `identity`;
// every thread gets the result. blockDim.x must be a multiple of 32 (<= 1024).
// The order of combination is fixed by the block size, so results are reproducible.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V value, Op op, V identity) {
  __shared__ V partial[32];
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  value = lane < warps ? partial[lane] : identity;
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a > b ? a : b; }
};

template <typename V>
__device__ __forceinline__ V warp_sum(V value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Running (max, sum of exp(x - max)) of a softmax row; merges are exact up to rounding.
struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.f;
  // Adds a group of values whose maximum is `group_max` and whose exp-sum relative to it is `group_sum`.
  __device__ __forceinline__ void merge(float other_max, float other_sum) {
    float m = fmaxf(max, other_max);
    if (m == -INFINITY) return;  // both empty (or all -inf)
    sum = sum * __expf(max - m) + other_sum * __expf(other_max - m);
    max = m;
  }
};

// Merges the states of all lanes of a warp (every lane gets the result).
__device__ __forceinline__ OnlineSoftmax warp_merge(OnlineSoftmax s) {
  for (int offset = 16; offset > 0; offset /= 2) {
    float m = __shfl_xor_sync(0xffffffffu, s.max, offset);
    float z = __shfl_xor_sync(0xffffffffu, s.sum, offset);
    s.merge(m, z);
  }
  return s;
}

// Merges the states of the whole block (every thread gets the result).
__device__ __forceinline__ OnlineSoftmax block_merge(OnlineSoftmax s) {
  __shared__ float maxes[32], sums[32];
  s = warp_merge(s);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) {
    maxes[warp] = s.max;
    sums[warp] = s.sum;
  }
  __syncthreads();
  OnlineSoftmax t;
  if (lane < warps) {
    t.max = maxes[lane];
    t.sum = sums[lane];
  }
  return warp_merge(t);
}

// A grid of `blocks` blocks of `threads`, capped at `waves` full waves of the device.
inline int64_t grid_size(int64_t work_items, int threads, int64_t cap = int64_t{1} << 20) {
  return std::max<int64_t>(1, std::min<int64_t>((work_items + threads - 1) / threads, cap));
}

// Sizes and per-operand strides of up to kMaxDims dims (row-major, element
// units), for kernels that walk strided or broadcast operands.
template <int kOperands>
struct StridedLayout {
  int ndim = 0;
  int64_t sizes[kMaxDims];
  int64_t strides[kOperands][kMaxDims];

  // Element offsets of the operands for the row-major linear index `i`; with
  // I = uint32_t (numel < 2^32) the index arithmetic is 32-bit, several times
  // cheaper than 64-bit division.
  template <typename I>
  __device__ __forceinline__ void offsets(I i, int64_t (&off)[kOperands]) const {
#pragma unroll
    for (int k = 0; k < kOperands; ++k) off[k] = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const I size = static_cast<I>(sizes[d]);
      const I idx = i % size;
      i /= size;
#pragma unroll
      for (int k = 0; k < kOperands; ++k) off[k] += static_cast<int64_t>(idx) * strides[k][d];
    }
  }
};

// Builds a layout for `shape` with each operand's strides, dropping size-1
// dims and merging adjacent dims that are contiguous for every operand.
template <int kOperands>
StridedLayout<kOperands> make_layout(const Shape& shape, const std::vector<Shape>& strides, const char* op) {
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> st(kOperands);
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    bool merge = !sizes.empty();
    for (int k = 0; k < kOperands && merge; ++k) merge = st[k].back() == strides[k][d] * shape[d];
    if (merge) {
      sizes.back() *= shape[d];
      for (int k = 0; k < kOperands; ++k) st[k].back() = strides[k][d];
    } else {
      sizes.push_back(shape[d]);
      for (int k = 0; k < kOperands; ++k) st[k].push_back(strides[k][d]);
    }
  }
  LOOM_CHECK(sizes.size() <= static_cast<size_t>(kMaxDims))
      << op << ": shape " << shape_str(shape) << " has " << sizes.size() << " non-mergeable dims, at most "
      << kMaxDims << " are supported";
  StridedLayout<kOperands> layout;
  layout.ndim = static_cast<int>(sizes.size());
  for (int d = 0; d < layout.ndim; ++d) {
    layout.sizes[d] = sizes[d];
    for (int k = 0; k < kOperands; ++k) layout.strides[k][d] = st[k][d];
  }
  return layout;
}

}  // namespace loom::cuda

// Dispatch a floating dtype (f64, f32, bf16, f16) to its CUDA element type.
#define LOOM_DISPATCH_CUDA_FLOATING(dtype, scalar_t, ...)                                     \
  [&] {                                                                                       \
    switch (dtype) {                                                                          \
      case ::loom::DType::f64: { using scalar_t = double; return __VA_ARGS__(); }             \
      case ::loom::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }              \
      case ::loom::DType::bf16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }     \
      case ::loom::DType::f16: { using scalar_t = __half; return __VA_ARGS__(); }             \
      default: LOOM_FAIL() << "dtype " << (dtype) << " is not supported by this CUDA kernel (f64, f32, bf16, f16)"; \
    }                                                                                         \
  }()

// Dispatch any dtype to its CUDA element type.
#define LOOM_DISPATCH_CUDA_ALL(dtype, scalar_t, ...)                                          \
  [&] {                                                                                       \
    switch (dtype) {                                                                          \
      case ::loom::DType::f64: { using scalar_t = double; return __VA_ARGS__(); }             \
      case ::loom::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }              \
      case ::loom::DType::bf16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }     \
      case ::loom::DType::f16: { using scalar_t = __half; return __VA_ARGS__(); }             \
      case ::loom::DType::i64: { using scalar_t = int64_t; return __VA_ARGS__(); }            \
      case ::loom::DType::i32: { using scalar_t = int32_t; return __VA_ARGS__(); }            \
      case ::loom::DType::u8: { using scalar_t = uint8_t; return __VA_ARGS__(); }             \
    }                                                                                         \
    LOOM_FAIL() << "unknown dtype";                                                           \
  }()
