// The Tensor layer's own device work: a strided element copy with dtype
// conversion (contiguous(), to(dtype), copy_ between views) and a strided fill.
// These sit in loom_tensor, below kernels/, because Tensor::copy_ and fill_
// must work on CUDA tensors of any layout without a host round trip; the
// optimized element-wise kernels of the ops live in kernels/cuda.
// One thread per element (grid-stride); the multi-index is decomposed from the
// linear row-major index, except when both sides are dense row-major (a cast,
// a copy of a contiguous block): then the index is the element's own, which
// takes the index arithmetic (two 64-bit divisions per dim and side) out of the
// hot loop (a bf16 -> f32 cast of 32M elements: 376 us before, on an H100).
// Conversions go through double for floating types (bf16/f16 through float, as
// the host conversions do; between bf16, f16 and f32 through float alone, the
// same values) and stay integral between integer types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "framework/cuda_check.h"
#include "framework/cuda_runtime.h"
#include "framework/dtype.h"

namespace loom::cuda_rt {

namespace {

template <typename T>
__device__ __forceinline__ double to_double(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return static_cast<double>(__bfloat162float(v));
  else if constexpr (std::is_same_v<T, __half>) return static_cast<double>(__half2float(v));
  else return static_cast<double>(v);
}

template <typename T>
__device__ __forceinline__ T from_double(double v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return v;
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return v;
}

template <typename T>
constexpr bool kFloatOrNarrower = std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16> ||
                                  std::is_same_v<T, __half>;

template <typename D, typename S>
__device__ __forceinline__ D convert(S v) {
  if constexpr (std::is_same_v<D, S>) return v;
  else if constexpr (std::is_integral_v<D> && std::is_integral_v<S>) return static_cast<D>(v);
  else if constexpr (kFloatOrNarrower<D> && kFloatOrNarrower<S>)
    return from_float<D>(to_float(v));  // the same values as through double: no f64 conversions
  else return from_double<D>(to_double(v));
}

// Element offset of linear row-major index i within a layout.
__device__ __forceinline__ long long element_offset(long long i, const StridedLayout& l) {
  long long off = l.offset;
  for (int d = l.ndim - 1; d >= 0; --d) {
    long long size = l.shape[d];
    long long idx = i % size;
    i /= size;
    off += idx * l.strides[d];
  }
  return off;
}

template <typename D, typename S>
__global__ void copy_kernel(D* dst, StridedLayout dl, const S* src, StridedLayout sl, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    dst[element_offset(i, dl)] = convert<D>(src[element_offset(i, sl)]);
}

// Both sides dense row-major: dst[i] = src[i] from the layouts' offsets.
template <typename D, typename S>
__global__ void copy_dense_kernel(D* __restrict__ dst, const S* __restrict__ src, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    dst[i] = convert<D>(src[i]);
}

template <typename T>
__global__ void fill_kernel(T* dst, StridedLayout dl, T value, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    dst[element_offset(i, dl)] = value;
}

long long numel(const StridedLayout& l) {
  long long n = 1;
  for (int d = 0; d < l.ndim; ++d) n *= l.shape[d];
  return n;
}

// True when the layout's elements are row-major and dense (sizes-1 dims: any stride).
bool dense_row_major(const StridedLayout& l) {
  long long expected = 1;
  for (int d = l.ndim - 1; d >= 0; --d) {
    if (l.shape[d] != 1 && l.strides[d] != expected) return false;
    expected *= l.shape[d];
  }
  return true;
}

unsigned blocks_for(long long n) {
  long long blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 65536 ? (blocks < 1 ? 1 : blocks) : 65536);
}

// Calls fn(T{}) with T the CUDA element type of `dtype`.
template <typename Fn>
void dispatch_dtype(int dtype, Fn&& fn) {
  switch (static_cast<DType>(dtype)) {
    case DType::f64: return fn(double{});
    case DType::f32: return fn(float{});
    case DType::bf16: return fn(__nv_bfloat16{});
    case DType::f16: return fn(__half{});
    case DType::i64: return fn(int64_t{});
    case DType::i32: return fn(int32_t{});
    case DType::u8: return fn(uint8_t{});
  }
  LOOM_FAIL() << "strided copy: unknown dtype code " << dtype;
}

void check_layout(const StridedLayout& l, const char* what) {
  LOOM_CHECK(l.ndim >= 0 && l.ndim <= kMaxDims) << "CUDA " << what << ": " << l.ndim << " dims (at most "
                                                << kMaxDims << ")";
}

}  // namespace

void strided_copy(void* dst_base, int dst_dtype, const StridedLayout& dst, const void* src_base, int src_dtype,
                  const StridedLayout& src, int device, void* stream) {
  check_layout(dst, "copy");
  check_layout(src, "copy");
  long long n = numel(dst);
  LOOM_CHECK(n == numel(src)) << "CUDA copy: " << n << " destination and " << numel(src) << " source elements";
  if (n == 0) return;
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dst_dtype, [&](auto d_tag) {
    using D = decltype(d_tag);
    dispatch_dtype(src_dtype, [&](auto s_tag) {
      using S = decltype(s_tag);
      // Both dense: linear index i is element offset + i on either side.
      if (dense_row_major(dst) && dense_row_major(src))
        copy_dense_kernel<D, S><<<blocks_for(n), 256, 0, s>>>(static_cast<D*>(dst_base) + dst.offset,
                                                              static_cast<const S*>(src_base) + src.offset, n);
      else
        copy_kernel<D, S><<<blocks_for(n), 256, 0, s>>>(static_cast<D*>(dst_base), dst,
                                                        static_cast<const S*>(src_base), src, n);
    });
  });
  LOOM_CUDA_CHECK(cudaGetLastError()) << "CUDA strided copy of " << n << " elements";
}

void strided_fill(void* dst_base, int dtype, const StridedLayout& dst, double value, int device, void* stream) {
  check_layout(dst, "fill");
  long long n = numel(dst);
  if (n == 0) return;
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T v;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) v = __float2bfloat16_rn(static_cast<float>(value));
    else if constexpr (std::is_same_v<T, __half>) v = __float2half_rn(static_cast<float>(value));
    else v = static_cast<T>(value);
    fill_kernel<T><<<blocks_for(n), 256, 0, s>>>(static_cast<T*>(dst_base), dst, v, n);
  });
  LOOM_CUDA_CHECK(cudaGetLastError()) << "CUDA fill of " << n << " elements";
}

}  // namespace loom::cuda_rt
