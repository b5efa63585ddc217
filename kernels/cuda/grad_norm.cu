// Sum of squares, non-finite count and in-place scale over many tensors on
// CUDA (see grad_norm.h). Tensors are grouped by dtype; each group goes out
// in tables of up to kMaxSpans tensors (multi_tensor.cuh). A reduction runs
// in two kernels: one block per chunk writes the chunk's partial (f64 sum or
// integer count, block-reduced in a fixed tree); then one warp per tensor adds
// its chunk partials in order. No atomics anywhere.
#include <algorithm>
#include <memory>
#include <numeric>

#include "kernels/cuda/grad_norm.h"
#include "kernels/cuda/multi_tensor.cuh"

namespace loom::cuda {

namespace {

using Table = multi::SpanTable<1>;

struct SumSquares {
  using V = double;
  template <typename T>
  __device__ __forceinline__ static V of(T x) {
    const double d = static_cast<double>(load_acc(x));
    return d * d;
  }
};
struct NonFinite {
  using V = unsigned long long;
  template <typename T>
  __device__ __forceinline__ static V of(T x) {
    return isfinite(load_acc(x)) ? 0ull : 1ull;
  }
};

template <typename T, typename Metric>
__global__ void __launch_bounds__(multi::kThreads) chunk_kernel(const __grid_constant__ Table table,
                                                                typename Metric::V* __restrict__ partial) {
  using V = typename Metric::V;
  const int64_t chunk = blockIdx.x;
  const int span = multi::find_span(table, chunk);
  const int64_t begin = (chunk - table.first_chunk[span]) * multi::kChunk;
  const int64_t end = min(table.numel[span], begin + multi::kChunk);
  const T* x = static_cast<const T*>(table.ptr[span][0]);
  V acc = 0;
  if (table.aligned[span]) {
    const int64_t vec_end = begin + (end - begin) / kVec<T> * kVec<T>;
    for (int64_t i = begin + threadIdx.x * kVec<T>; i < vec_end; i += blockDim.x * kVec<T>) {
      const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(x + i);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) acc += Metric::of(v.v[j]);
    }
    for (int64_t i = vec_end + threadIdx.x; i < end; i += blockDim.x) acc += Metric::of(x[i]);
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc += Metric::of(x[i]);
  }
  acc = block_reduce(acc, SumOp{}, V(0));
  if (threadIdx.x == 0) partial[chunk] = acc;
}

// One warp per span: out[index] = sum of the span's chunk partials (lane-strided, fixed tree).
template <typename V, typename O>
__global__ void span_total_kernel(O* __restrict__ out, const V* __restrict__ partial, const __grid_constant__ Table table) {
  const int span = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (span >= table.count) return;
  const int lane = threadIdx.x % 32;
  V acc = 0;
  for (int64_t c = table.first_chunk[span] + lane; c < table.first_chunk[span + 1]; c += 32) acc += partial[c];
  acc = warp_sum(acc);
  if (lane == 0) out[table.index[span]] = static_cast<O>(acc);
}

template <typename T>
__global__ void __launch_bounds__(multi::kThreads) scale_kernel(const __grid_constant__ Table table, double alpha) {
  using C = acc_t<T>;
  const int64_t chunk = blockIdx.x;
  const int span = multi::find_span(table, chunk);
  const int64_t begin = (chunk - table.first_chunk[span]) * multi::kChunk;
  const int64_t end = min(table.numel[span], begin + multi::kChunk);
  T* x = static_cast<T*>(table.ptr[span][0]);
  const C a = static_cast<C>(alpha);
  int64_t scalar_from = begin;
  if (table.aligned[span]) {
    const int64_t vec_end = begin + (end - begin) / kVec<T> * kVec<T>;
    for (int64_t i = begin + threadIdx.x * kVec<T>; i < vec_end; i += blockDim.x * kVec<T>) {
      Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(x + i);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) v.v[j] = store_acc<T>(mul_rn(load_acc(v.v[j]), a));
      *reinterpret_cast<Vec16<T>*>(x + i) = v;
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x) x[i] = store_acc<T>(mul_rn(load_acc(x[i]), a));
}

void check_input(const Tensor& x, const Stream& s, const char* op, size_t index) {
  LOOM_CHECK(x.defined()) << op << ": tensor " << index << " is undefined";
  check_device_tensor(x, s, op, "x");
  LOOM_CHECK(is_floating(x.dtype())) << op << ": tensor " << index << " has dtype " << x.dtype()
                                     << ", not floating";
}

void check_out(const Tensor& out, size_t count, DType dtype, const Stream& s, const char* op) {
  check_device_tensor(out, s, op, "out");
  LOOM_CHECK(out.numel() == static_cast<int64_t>(count) && out.dtype() == dtype)
      << op << ": out must be " << dtype << " with " << count << " elements, got " << shape_str(out.shape()) << " "
      << out.dtype();
}

// Calls fn(T, begin, end) for runs of xs (in `order`) sharing a dtype.
template <typename Fn>
void for_each_dtype_group(const std::vector<Tensor>& xs, Fn&& fn) {
  std::vector<size_t> order(xs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return xs[a].dtype() < xs[b].dtype(); });
  for (size_t begin = 0; begin < order.size();) {
    size_t end = begin + 1;
    while (end < order.size() && xs[order[end]].dtype() == xs[order[begin]].dtype()) ++end;
    LOOM_DISPATCH_CUDA_FLOATING(xs[order[begin]].dtype(), T, [&] { fn(T{}, order, begin, end); });
    begin = end;
  }
}

// out[i] = Metric over xs[i], as O.
template <typename Metric, typename O>
void reduce_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s) {
  using V = typename Metric::V;
  if (out.numel() > 0) LOOM_CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, out.nbytes(), raw(s)));  // empty tensors
  O* op = static_cast<O*>(out.raw_data());
  for_each_dtype_group(xs, [&](auto tag, const std::vector<size_t>& order, size_t begin, size_t end) {
    using T = decltype(tag);
    multi::TableBuilder<1> builder([&](const Table& table, int64_t chunks) {
      Storage partial(static_cast<size_t>(chunks) * sizeof(V), out.device(), &s);
      chunk_kernel<T, Metric><<<static_cast<unsigned>(chunks), multi::kThreads, 0, raw(s)>>>(
          table, static_cast<V*>(partial.data()));
      LOOM_CUDA_CHECK(cudaGetLastError());
      const int warps_per_block = multi::kThreads / 32;
      span_total_kernel<V, O><<<(table.count + warps_per_block - 1) / warps_per_block, multi::kThreads, 0, raw(s)>>>(
          op, static_cast<const V*>(partial.data()), table);
      LOOM_CUDA_CHECK(cudaGetLastError());
    });
    for (size_t k = begin; k < end; ++k) {
      const Tensor& x = xs[order[k]];
      builder.add({x.raw_data()}, x.numel(), 0.0, static_cast<int64_t>(order[k]), pack_aligned<T, kVec<T>>(x.raw_data()));
    }
    builder.flush();
  });
}

}  // namespace

void sum_squares_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s) {
  for (size_t i = 0; i < xs.size(); ++i) check_input(xs[i], s, "sum_squares", i);
  check_out(out, xs.size(), DType::f64, s, "sum_squares");
  reduce_many<SumSquares, double>(out, xs, s);
}

void count_nonfinite_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s) {
  for (size_t i = 0; i < xs.size(); ++i) check_input(xs[i], s, "count_nonfinite", i);
  check_out(out, xs.size(), DType::i64, s, "count_nonfinite");
  reduce_many<NonFinite, int64_t>(out, xs, s);
}

void scale_inplace_many(const std::vector<Tensor>& xs, double alpha, Stream& s) {
  for (size_t i = 0; i < xs.size(); ++i) check_input(xs[i], s, "scale_inplace", i);
  for_each_dtype_group(xs, [&](auto tag, const std::vector<size_t>& order, size_t begin, size_t end) {
    using T = decltype(tag);
    multi::TableBuilder<1> builder([&](const Table& table, int64_t chunks) {
      scale_kernel<T><<<static_cast<unsigned>(chunks), multi::kThreads, 0, raw(s)>>>(table, alpha);
      LOOM_CUDA_CHECK(cudaGetLastError());
    });
    for (size_t k = begin; k < end; ++k) {
      const Tensor& x = xs[order[k]];
      builder.add({x.raw_data()}, x.numel(), 0.0, static_cast<int64_t>(order[k]), pack_aligned<T, kVec<T>>(x.raw_data()));
    }
    builder.flush();
  });
}

void sum_squares(Tensor& out, const Tensor& x, Stream& s) { sum_squares_many(out, {x}, s); }
void scale_inplace(Tensor& x, double alpha, Stream& s) { scale_inplace_many({x}, alpha, s); }
void count_nonfinite(Tensor& out, const Tensor& x, Stream& s) { count_nonfinite_many(out, {x}, s); }

}  // namespace loom::cuda
