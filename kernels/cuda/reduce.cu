// Sum reductions on CUDA (see reduce.h). Every reduction is brought to the
// form (outer, n, inner) over a contiguous buffer and summed over n:
// - inner == 1 (contiguous segments): block (o, split) sums one fixed chunk of
//   segment o with 16-byte loads and a block reduction;
// - inner > 1 (columns): each thread owns kVec adjacent columns (16-byte loads
//   along the row) and walks a fixed range of rows.
// When one block per output is too little parallelism, the range over n is
// split in chunks that depend only on the shape; the chunk partials (double)
// are added in order by a second kernel. No atomics, so results are bitwise
// reproducible. sum_to maps its broadcast pattern onto the same form, with a
// permuted contiguous copy for patterns that do not fit.
#include <cmath>
#include <memory>

#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/kernel_utils.cuh"
#include "kernels/cuda/reduce.h"

namespace loom::cuda {

namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kTargetBlocks = 1024;    // segment sums: enough blocks to fill an H100 several times over
constexpr int64_t kTargetThreads = 131072;  // column sums: threads in flight for full bandwidth
constexpr int64_t kMinRows = 64;            // column sums: rows per split at least

int pow2_threads(int64_t work) {
  int t = 32;
  while (t < kMaxThreads && t < work) t *= 2;
  return t;
}

template <typename T>
__device__ __forceinline__ double as_double(T v) {
  return static_cast<double>(load_acc(v));
}

// Block (o = blockIdx.x, split = blockIdx.y) sums x[o * n + [split * chunk, ...)) into
// partial[o * splits + split], or straight into out[o] when there is one split.
template <typename T, typename O, bool kVectorized>
__global__ void segment_sum_kernel(O* out, double* partial, const T* x, int64_t n, int64_t chunk) {
  const int64_t o = blockIdx.x;
  const T* seg = x + o * n;
  const int64_t begin = blockIdx.y * chunk, end = min(n, begin + chunk);
  double acc = 0.0;
  if constexpr (kVectorized) {
    for (int64_t i = begin + threadIdx.x * kVec<T>; i < end; i += blockDim.x * kVec<T>) {
      Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(seg + i);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) acc += as_double(v.v[j]);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc += as_double(seg[i]);
  }
  acc = block_reduce(acc, SumOp{}, 0.0);
  if (threadIdx.x != 0) return;
  if (partial != nullptr) partial[o * gridDim.y + blockIdx.y] = acc;
  else out[o] = convert<O>(acc);
}

// Short segments (n <= kWarpSegment): one warp per segment, kWarpsPerBlock
// segments per block, lanes striding by vectors (or elements), f64 partials
// combined by shuffles in a fixed order. A block per segment would leave most
// of its threads idle and pay a block barrier per 128 elements (the per-head
// gate gradient's sum over D of 32M elements: 160 us that way on an H100).
constexpr int64_t kWarpSegment = 1024;
constexpr int kWarpsPerBlock = 8;

template <typename T, typename O, bool kVectorized>
__global__ void segment_warp_sum_kernel(O* out, const T* x, int64_t n, int64_t outer) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (o >= outer) return;  // whole warps leave: the shuffles below see full warps
  const int lane = threadIdx.x % 32;
  const T* seg = x + o * n;
  double acc = 0.0;
  if constexpr (kVectorized) {
    for (int64_t i = lane * kVec<T>; i < n; i += 32 * kVec<T>) {
      Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(seg + i);
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) acc += as_double(v.v[j]);
    }
  } else {
    for (int64_t i = lane; i < n; i += 32) acc += as_double(seg[i]);
  }
  acc = warp_sum(acc);
  if (lane == 0) out[o] = convert<O>(acc);
}

// Thread column c0 = (blockIdx.x % col_blocks) * blockDim.x + threadIdx.x) * V of outer
// o = blockIdx.x / col_blocks sums rows [split * rows, ...) of V adjacent columns.
template <typename T, typename O, int V>
__global__ void column_sum_kernel(O* out, double* partial, const T* x, int64_t n, int64_t inner, int64_t col_blocks,
                                  int64_t rows) {
  const int64_t o = blockIdx.x / col_blocks;
  const int64_t c0 = ((blockIdx.x % col_blocks) * blockDim.x + threadIdx.x) * V;
  if (c0 >= inner) return;
  const int64_t begin = blockIdx.y * rows, end = min(n, begin + rows);
  double acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = 0.0;
  const T* col = x + o * n * inner + c0;
#pragma unroll 4
  for (int64_t j = begin; j < end; ++j) {
    if constexpr (V > 1) {
      Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(col + j * inner);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += as_double(v.v[k]);
    } else {
      acc[0] += as_double(col[j * inner]);
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (partial != nullptr) partial[(o * gridDim.y + blockIdx.y) * inner + c0 + k] = acc[k];
    else out[o * inner + c0 + k] = convert<O>(acc[k]);
  }
}

// out[o * inner + i] = sum over s of partial[(o * splits + s) * inner + i]: a warp per
// output, lane l summing splits l, l + 32, ..., then the lanes by shuffles (a fixed
// order). One thread per output walked up to 1024 partials as a chain of dependent
// loads (74 us for a whole-tensor sum on an H100).
template <typename O>
__global__ void sum_partials_kernel(O* out, const double* partial, int64_t outputs, int64_t splits, int64_t inner) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (idx >= outputs) return;  // whole warps leave
  const int lane = threadIdx.x % 32;
  const int64_t o = idx / inner, i = idx % inner;
  double acc = 0.0;
  for (int64_t sp = lane; sp < splits; sp += 32) acc += partial[(o * splits + sp) * inner + i];
  acc = warp_sum(acc);
  if (lane == 0) out[idx] = convert<O>(acc);
}

// out (outer * inner, contiguous) = x (outer, n, inner, contiguous) summed over n.
void sum_middle(const Tensor& out, const void* x, DType x_dtype, int64_t outer, int64_t n, int64_t inner, Stream& s) {
  const int64_t outputs = outer * inner;
  if (outputs == 0) return;
  if (n == 0) {  // empty sums: zero bits are 0 in every floating dtype
    LOOM_CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, out.nbytes(), raw(s)));
    return;
  }
  LOOM_DISPATCH_CUDA_FLOATING(x_dtype, T, [&] {
    LOOM_DISPATCH_CUDA_FLOATING(out.dtype(), O, [&] {
      const T* xp = static_cast<const T*>(x);
      O* op = static_cast<O*>(out.raw_data());
      std::unique_ptr<Storage> partial;
      int64_t splits = 1;
      if (inner == 1 && n <= kWarpSegment) {
        const bool vec = vectorizable<T>(n, {xp});
        const unsigned blocks = static_cast<unsigned>((outer + kWarpsPerBlock - 1) / kWarpsPerBlock);
        if (vec) segment_warp_sum_kernel<T, O, true><<<blocks, 32 * kWarpsPerBlock, 0, raw(s)>>>(op, xp, n, outer);
        else segment_warp_sum_kernel<T, O, false><<<blocks, 32 * kWarpsPerBlock, 0, raw(s)>>>(op, xp, n, outer);
      } else if (inner == 1) {
        const bool vec = vectorizable<T>(n, {xp});
        const int64_t width = vec ? kVec<T> : 1;
        const int threads = pow2_threads((n + width - 1) / width);
        const int64_t per_block_min = threads * width * 4;
        splits = std::max<int64_t>(1, std::min((n + per_block_min - 1) / per_block_min,
                                               (kTargetBlocks + outer - 1) / outer));
        int64_t chunk = (n + splits - 1) / splits;
        chunk = (chunk + width - 1) / width * width;
        splits = (n + chunk - 1) / chunk;
        if (splits > 1) partial = std::make_unique<Storage>(outer * splits * sizeof(double), out.device(), &s);
        double* pp = partial ? static_cast<double*>(partial->data()) : nullptr;
        dim3 grid(static_cast<unsigned>(outer), static_cast<unsigned>(splits));
        if (vec) segment_sum_kernel<T, O, true><<<grid, threads, 0, raw(s)>>>(op, pp, xp, n, chunk);
        else segment_sum_kernel<T, O, false><<<grid, threads, 0, raw(s)>>>(op, pp, xp, n, chunk);
      } else {
        const bool vec = vectorizable<T>(inner, {xp});
        const int64_t width = vec ? kVec<T> : 1;
        const int64_t col_threads = inner / width;
        const int threads = pow2_threads(col_threads);
        const int64_t col_blocks = (col_threads + threads - 1) / threads;
        // Enough blocks for ~128K threads, but at least kMinRows rows per split so
        // that the f64 partials stay small next to the input.
        const int64_t blocks_wanted = (kTargetThreads + threads - 1) / threads;
        splits = std::max<int64_t>(1, std::min((n + kMinRows - 1) / kMinRows,
                                               (blocks_wanted + outer * col_blocks - 1) / (outer * col_blocks)));
        const int64_t rows = (n + splits - 1) / splits;
        splits = (n + rows - 1) / rows;
        if (splits > 1) partial = std::make_unique<Storage>(outer * splits * inner * sizeof(double), out.device(), &s);
        double* pp = partial ? static_cast<double*>(partial->data()) : nullptr;
        dim3 grid(static_cast<unsigned>(outer * col_blocks), static_cast<unsigned>(splits));
        if (vec) column_sum_kernel<T, O, kVec<T>><<<grid, threads, 0, raw(s)>>>(op, pp, xp, n, inner, col_blocks, rows);
        else column_sum_kernel<T, O, 1><<<grid, threads, 0, raw(s)>>>(op, pp, xp, n, inner, col_blocks, rows);
      }
      LOOM_CUDA_CHECK(cudaGetLastError());
      if (partial) {
        const unsigned blocks = static_cast<unsigned>((outputs + kWarpsPerBlock - 1) / kWarpsPerBlock);
        sum_partials_kernel<O><<<blocks, 32 * kWarpsPerBlock, 0, raw(s)>>>(
            op, static_cast<const double*>(partial->data()), outputs, splits, inner);
        LOOM_CUDA_CHECK(cudaGetLastError());
      }
    });
  });
}

void check_operands(const Tensor& out, const Tensor& x, int64_t expected_numel, const Stream& s, const char* op) {
  check_device_tensor(x, s, op, "x");
  check_device_tensor(out, s, op, "out");
  LOOM_CHECK(is_floating(x.dtype()) &&
             (out.dtype() == x.dtype() || out.dtype() == DType::f32 || out.dtype() == DType::f64))
      << op << ": output dtype " << out.dtype() << " for input " << x.dtype() << " (needs the input's, f32 or f64)";
  LOOM_CHECK(out.numel() == expected_numel) << op << ": output " << shape_str(out.shape()) << " for input "
                                            << shape_str(x.shape()) << ", expected " << expected_numel
                                            << " elements";
}

}  // namespace

void sum_all(Tensor& out, const Tensor& x, Stream& s) {
  check_operands(out, x, 1, s, "sum_all");
  sum_middle(out, x.raw_data(), x.dtype(), 1, x.numel(), 1, s);
}

void sum_dim(Tensor& out, const Tensor& x, int64_t dim, Stream& s) {
  dim = wrap_dim(dim, x.dim());
  int64_t outer = 1, inner = 1, n = x.size(dim);
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  check_operands(out, x, outer * inner, s, "sum_dim");
  sum_middle(out, x.raw_data(), x.dtype(), outer, n, inner, s);
}

void sum_to(Tensor& out, const Tensor& x, Stream& s) {
  LOOM_CHECK(out.defined() && x.defined() && x.device().is_cuda() && x.device() == s.device())
      << "sum_to: x must be on " << s.device();
  check_device_tensor(out, s, "sum_to", "out");
  LOOM_CHECK(broadcast_shapes(out.shape(), x.shape()) == x.shape())
      << "sum_to: " << shape_str(out.shape()) << " does not broadcast to " << shape_str(x.shape());
  LOOM_CHECK(is_floating(x.dtype()) &&
             (out.dtype() == x.dtype() || out.dtype() == DType::f32 || out.dtype() == DType::f64))
      << "sum_to: output dtype " << out.dtype() << " for input " << x.dtype();
  if (out.numel() == 0) return;
  if (x.numel() == 0) {  // every sum is empty
    sum_middle(out, nullptr, x.dtype(), out.numel(), 0, 1, s);
    return;
  }
  // out's shape aligned to x's rank; dims of size 1 in x are dropped, runs of
  // kept (K) or reduced (R) dims merged.
  const int64_t lead = x.dim() - out.dim();
  std::vector<int64_t> group_size;
  std::vector<bool> group_reduced;
  std::vector<int64_t> kept_dims, reduced_dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) == 1) continue;
    const bool reduced = d < lead || out.size(d - lead) == 1;
    (reduced ? reduced_dims : kept_dims).push_back(d);
    if (!group_size.empty() && group_reduced.back() == reduced) {
      group_size.back() *= x.size(d);
    } else {
      group_size.push_back(x.size(d));
      group_reduced.push_back(reduced);
    }
  }
  if (reduced_dims.empty()) {  // nothing to sum: a (converting) copy
    Tensor view = out.view(x.shape());
    copy_cast(view, x, s);
    return;
  }
  int64_t outer = 1, n = 1, inner = 1;
  const size_t groups = group_size.size();
  const bool fits = x.is_contiguous() && groups <= 3 && (groups < 3 || !group_reduced[0]) &&
                    (groups != 2 || group_reduced[0] != group_reduced[1]);
  if (fits) {
    // Patterns [R], [K R], [R K], [K R K].
    size_t g = 0;
    if (!group_reduced[g]) outer = group_size[g++];
    n = group_size[g++];
    if (g < groups) inner = group_size[g];
    sum_middle(out, x.raw_data(), x.dtype(), outer, n, inner, s);
    return;
  }
  // Any other pattern (or strided x): copy x with kept dims first, reduced
  // dims last, into a contiguous buffer on the stream, then sum its rows.
  std::vector<int64_t> order = kept_dims;
  order.insert(order.end(), reduced_dims.begin(), reduced_dims.end());
  Shape permuted_shape;
  for (int64_t d : order) permuted_shape.push_back(x.size(d));
  Tensor squeezed = x;
  for (int64_t d = x.dim() - 1; d >= 0; --d)
    if (x.size(d) == 1) squeezed = squeezed.squeeze(d);
  // Indices in `order` refer to x's dims; map them onto the squeezed dims.
  std::vector<int64_t> squeezed_index(x.dim(), -1);
  for (int64_t d = 0, k = 0; d < x.dim(); ++d)
    if (x.size(d) != 1) squeezed_index[d] = k++;
  std::vector<int64_t> squeezed_order;
  for (int64_t d : order) squeezed_order.push_back(squeezed_index[d]);
  Tensor permuted = squeezed.permute(squeezed_order);
  auto buffer = std::make_shared<Storage>(static_cast<size_t>(x.numel()) * dtype_size(x.dtype()), x.device(), &s);
  Tensor dense = make_tensor(buffer, permuted_shape, contiguous_strides(permuted_shape), 0, x.dtype());
  copy_cast(dense, permuted, s);
  for (int64_t d : kept_dims) outer *= x.size(d);
  for (int64_t d : reduced_dims) n *= x.size(d);
  sum_middle(out, dense.raw_data(), x.dtype(), outer, n, 1, s);
}

}  // namespace loom::cuda
