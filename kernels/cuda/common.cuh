// Helpers shared by the CUDA kernels: element loads/stores in fp32 for every
// storage dtype, 16-byte vector access, block reductions, and the dispatch of
// a storage dtype to its CUDA type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "framework/cuda_check.h"
#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return __float2half_rn(v);
}

// sigmoid in fp32 (0 where exp(-x) overflows).
__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

// Elements of T per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// A 16-byte chunk viewed as elements.
template <typename T>
struct alignas(16) Vec16 {
  T v[kVec<T>];
};

// True when every pointer is 16-byte aligned and `n` is a multiple of the vector width.
template <typename T>
inline bool vectorizable(int64_t n, std::initializer_list<const void*> pointers) {
  if (n % kVec<T> != 0) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  int warps = blockDim.x / 32;
  value = lane < warps ? partial[lane] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

inline cudaStream_t raw(Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

// Checks that `t` is a contiguous tensor on the stream's device.
inline void check_device_tensor(const Tensor& t, const Stream& s, const char* op, const char* name) {
  LOOM_CHECK(t.defined() && t.device().is_cuda() && t.device() == s.device())
      << op << ": " << name << " must be on " << s.device() << (t.defined() ? ", is on " + t.device().str() : "");
  LOOM_CHECK(t.is_contiguous()) << op << ": " << name << " " << shape_str(t.shape()) << " must be contiguous";
}

}  // namespace loom::cuda

// Dispatch a storage dtype (f32, bf16, f16) to its CUDA element type.
#define LOOM_DISPATCH_CUDA_FLOAT(dtype, scalar_t, ...)                                        \
  [&] {                                                                                       \
    switch (dtype) {                                                                          \
      case ::loom::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }              \
      case ::loom::DType::bf16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }     \
      case ::loom::DType::f16: { using scalar_t = __half; return __VA_ARGS__(); }             \
      default: LOOM_FAIL() << "dtype " << (dtype) << " is not supported by this CUDA kernel (f32, bf16, f16)"; \
    }                                                                                         \
  }()
