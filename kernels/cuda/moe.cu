// MoE dispatch kernels on CUDA (see moe.h). The gather is one block per output
// row. The scatter-add sorts (index, position) pairs stably with CUB, and the
// block that meets the first position of a run of equal indices sums that run's
// rows in position order: every output row is written by one block, in a fixed
// order, so results are bitwise reproducible. log-sum-exp and top-k use one warp
// per row. The grouped linear is one cuBLASLt GEMM per non-empty expert: the
// offsets are a host-side routing plan, so no device count has to be read here.
#include <cub/device/device_radix_sort.cuh>

#include <initializer_list>
#include <limits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/moe.h"
#include "kernels/moh_gate_row.h"

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// Records the smallest position whose index lies outside [0, n) in *bad (initialized to count).
__global__ void check_index_kernel(unsigned long long* bad, const int64_t* index, int64_t count, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < count && (index[i] < 0 || index[i] >= n)) atomicMin(bad, static_cast<unsigned long long>(i));
}

// Throws naming the first index outside [0, n). One host sync: the check must
// finish before any kernel reads rows at these indices.
void check_index(const Tensor& index, int64_t n, Stream& s, const char* op) {
  const int64_t count = index.numel();
  if (count == 0) return;
  Storage bad(sizeof(unsigned long long), index.device(), &s);
  unsigned long long none = static_cast<unsigned long long>(count);
  LOOM_CUDA_CHECK(cudaMemcpyAsync(bad.data(), &none, sizeof(none), cudaMemcpyHostToDevice, raw(s)));
  check_index_kernel<<<static_cast<unsigned>((count + kThreads - 1) / kThreads), kThreads, 0, raw(s)>>>(
      static_cast<unsigned long long*>(bad.data()), index.data<int64_t>(), count, n);
  LOOM_CUDA_CHECK(cudaGetLastError());
  unsigned long long first_bad = none;
  LOOM_CUDA_CHECK(cudaMemcpyAsync(&first_bad, bad.data(), sizeof(first_bad), cudaMemcpyDeviceToHost, raw(s)));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(raw(s)));
  if (first_bad < none) {
    const int64_t at = static_cast<int64_t>(first_bad);
    Tensor one = index.flatten().narrow(0, at, 1).to(Device::cpu());
    LOOM_FAIL() << op << ": index " << static_cast<int64_t>(one.item()) << " at position " << at << " is outside [0, "
                << n << ")";
  }
}

template <typename T>
__global__ void gather_rows_kernel(T* __restrict__ out, const T* __restrict__ x, const int64_t* __restrict__ index,
                                   int64_t cols) {
  const int64_t row = blockIdx.x;
  const T* src = x + index[row] * cols;
  T* dst = out + row * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

__global__ void index_to_keys_kernel(int32_t* keys, int32_t* positions, const int64_t* index, int64_t count) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < count) {
    keys[i] = static_cast<int32_t>(index[i]);
    positions[i] = static_cast<int32_t>(i);
  }
}

// Block b handles sorted slot b when it starts a run of equal indices: out[id] += the run's rows, in position order.
template <typename T>
__global__ void add_runs_kernel(T* __restrict__ out, const T* __restrict__ rows, const int32_t* __restrict__ keys,
                                const int32_t* __restrict__ positions, int64_t count, int64_t cols) {
  const int64_t start = blockIdx.x;
  const int32_t id = keys[start];
  if (start > 0 && keys[start - 1] == id) return;
  T* dst = out + static_cast<int64_t>(id) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float sum = 0.f;
    for (int64_t j = start; j < count && keys[j] == id; ++j) sum += to_float(rows[positions[j] * cols + c]);
    dst[c] = from_float<T>(to_float(dst[c]) + sum);
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename T>
__global__ void logsumexp_forward_kernel(float* __restrict__ lse, const T* __restrict__ x, int64_t rows, int64_t cols) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* xr = x + row * cols;
  float m = -INFINITY;
  for (int64_t j = lane; j < cols; j += 32) m = fmaxf(m, to_float(xr[j]));
  m = warp_max(m);
  float sum = 0.f;
  if (!isinf(m))
    for (int64_t j = lane; j < cols; j += 32) sum += expf(to_float(xr[j]) - m);
  sum = warp_sum(sum);
  if (lane == 0) lse[row] = isinf(m) ? m : m + logf(sum);  // empty or infinite rows: the sum is exp(m)
}

template <typename T>
__global__ void logsumexp_backward_kernel(T* __restrict__ grad_x, const float* __restrict__ grad_lse,
                                          const T* __restrict__ x, const float* __restrict__ lse, int64_t rows,
                                          int64_t cols) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t row = i / cols;
  const float l = lse[row];
  grad_x[i] = from_float<T>(isinf(l) ? 0.f : grad_lse[row] * expf(to_float(x[i]) - l));
}

// (value, column) a ranks before (value, column) b: larger value, then lower column.
__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
  return av > bv || (av == bv && ai < bi);
}

// One warp per row: k rounds, each taking the best entry ranked after the previous pick.
template <typename T>
__global__ void topk_kernel(int64_t* __restrict__ indices, unsigned long long* __restrict__ nan_at,
                            const T* __restrict__ scores, int64_t rows, int64_t cols, int64_t k) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* sr = scores + row * cols;
  for (int64_t j = lane; j < cols; j += 32)
    if (isnan(to_float(sr[j]))) atomicMin(nan_at, static_cast<unsigned long long>(row * cols + j));
  float prev_v = INFINITY;
  int prev_i = -1;  // nothing picked yet: every entry ranks after (+inf, -1)
  for (int64_t r = 0; r < k; ++r) {
    float best_v = -INFINITY;
    int best_i = std::numeric_limits<int>::max();  // no candidate (loses every comparison)
    for (int64_t j = lane; j < cols; j += 32) {
      const float v = to_float(sr[j]);
      const int jj = static_cast<int>(j);
      if (ranks_before(prev_v, prev_i, v, jj) && ranks_before(v, jj, best_v, best_i)) {
        best_v = v;
        best_i = jj;
      }
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(kFull, best_v, o);
      const int oi = __shfl_xor_sync(kFull, best_i, o);
      if (ranks_before(ov, oi, best_v, best_i)) {
        best_v = ov;
        best_i = oi;
      }
    }
    if (lane == 0) indices[row * k + r] = best_i;
    prev_v = best_v;
    prev_i = best_i;
  }
}

// a ranks before b in topk_mask_rows' order: numbers before NaN, larger value, then lower column.
__device__ __forceinline__ bool ranks_before_nan_last(float av, int ai, float bv, int bi) {
  const bool an = isnan(av), bn = isnan(bv);
  if (an != bn) return bn;
  return (!an && av > bv) || ((an || av == bv) && ai < bi);
}

// One warp per row: k rounds find the k-th entry in that order (column -1: none yet), then
// every entry ranked up to it is marked. No flag, no host sync.
template <typename T>
__global__ void topk_mask_kernel(T* __restrict__ mask, const T* __restrict__ scores, int64_t rows, int cols,
                                 int64_t k) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* sr = scores + row * cols;
  float kth_v = 0.f;
  int kth_i = -1;
  for (int64_t r = 0; r < k; ++r) {
    float best_v = 0.f;
    int best_i = -1;
    for (int j = lane; j < cols; j += 32) {
      const float v = to_float(sr[j]);
      if ((kth_i < 0 || ranks_before_nan_last(kth_v, kth_i, v, j)) &&
          (best_i < 0 || ranks_before_nan_last(v, j, best_v, best_i))) {
        best_v = v;
        best_i = j;
      }
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(kFull, best_v, o);
      const int oi = __shfl_xor_sync(kFull, best_i, o);
      if (oi >= 0 && (best_i < 0 || ranks_before_nan_last(ov, oi, best_v, best_i))) {
        best_v = ov;
        best_i = oi;
      }
    }
    kth_v = best_v;
    kth_i = best_i;
  }
  for (int j = lane; j < cols; j += 32) {
    const bool picked = j == kth_i || ranks_before_nan_last(to_float(sr[j]), j, kth_v, kth_i);
    mask[row * cols + j] = from_float<T>(picked ? 1.f : 0.f);
  }
}

// A thread per row of the MoH gate (rows are a few dozen values: the row math
// of kernels/moh_gate_row.h as it is).
template <typename T>
__global__ void moh_gate_kernel(T* __restrict__ gate, const T* __restrict__ p, const T* __restrict__ mask,
                                const T* __restrict__ z, int64_t rows, int64_t e, int64_t zc, int64_t shared,
                                int64_t k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  moh::gate_row(gate + i * (shared + e), p + i * e, mask + i * e, z != nullptr ? z + i * zc : nullptr, e, shared, k);
}

template <typename T>
__global__ void moh_gate_backward_kernel(T* __restrict__ dp, T* __restrict__ dz, const T* __restrict__ dgate,
                                         const T* __restrict__ p, const T* __restrict__ mask,
                                         const T* __restrict__ z, int64_t rows, int64_t e, int64_t zc,
                                         int64_t shared, int64_t k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  moh::gate_row_backward(dp + i * e, dz != nullptr ? dz + i * zc : nullptr, dgate + i * (shared + e), p + i * e,
                         mask + i * e, z != nullptr ? z + i * zc : nullptr, e, shared, k);
}

template <typename Fn>
void dispatch_f32_f64(DType dtype, const char* op, Fn&& fn) {
  if (dtype == DType::f32) fn(float{});
  else if (dtype == DType::f64) fn(double{});
  else LOOM_FAIL() << op << ": dtype " << dtype << " is not supported on CUDA (f32, f64)";
}

template <typename Fn>
void dispatch_dtype(DType dtype, const char* op, Fn&& fn) {
  if (dtype == DType::f32) fn(float{});
  else if (dtype == DType::bf16) fn(__nv_bfloat16{});
  else LOOM_FAIL() << op << ": dtype " << dtype << " is not supported on CUDA (f32, bf16)";
}

void check_index_tensor(const Tensor& index, const Stream& s, const char* op) {
  check_device_tensor(index, s, op, "index");
  LOOM_CHECK(index.dtype() == DType::i64) << op << ": index must be i64, got " << index.dtype();
}

// Both 2-D on the stream's device, contiguous, one dtype and width; `rows` has one row per index.
void check_rows(const Tensor& table, const Tensor& rows, int64_t count, const Stream& s, const char* op) {
  check_device_tensor(table, s, op, "table");
  check_device_tensor(rows, s, op, "rows");
  LOOM_CHECK(table.dim() == 2 && rows.dim() == 2 && table.size(1) == rows.size(1) && rows.size(0) == count)
      << op << ": table " << shape_str(table.shape()) << ", rows " << shape_str(rows.shape()) << ", " << count
      << " indices";
  LOOM_CHECK(table.dtype() == rows.dtype()) << op << ": dtypes differ, " << table.dtype() << " vs " << rows.dtype();
}

void check_matrix(const Tensor& x, const Stream& s, const char* op, const char* name) {
  check_device_tensor(x, s, op, name);
  LOOM_CHECK(x.dim() == 2) << op << ": " << name << " must be (N, K), got " << shape_str(x.shape());
}

unsigned row_warps_blocks(int64_t rows) { return static_cast<unsigned>((rows + kWarps - 1) / kWarps); }

}  // namespace

void index_select_rows(Tensor& out, const Tensor& x, const Tensor& index, Stream& s) {
  const char* op = "index_select_rows";
  check_index_tensor(index, s, op);
  check_rows(x, out, index.numel(), s, op);
  check_index(index, x.size(0), s, op);
  const int64_t count = index.numel(), cols = x.size(1);
  if (count == 0 || cols == 0) return;
  dispatch_dtype(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    gather_rows_kernel<T><<<static_cast<unsigned>(count), kThreads, 0, raw(s)>>>(
        static_cast<T*>(out.raw_data()), static_cast<const T*>(x.raw_data()), index.data<int64_t>(), cols);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void index_add_rows(Tensor& out, const Tensor& rows, const Tensor& index, Stream& s) {
  const char* op = "index_add_rows";
  check_index_tensor(index, s, op);
  check_rows(out, rows, index.numel(), s, op);
  const int64_t count = index.numel(), cols = out.size(1), n = out.size(0);
  LOOM_CHECK(n < (int64_t{1} << 31) && count < (int64_t{1} << 31))
      << op << ": " << n << " rows and " << count << " indices must fit int32";
  check_index(index, n, s, op);
  if (count == 0 || cols == 0) return;
  // keys/positions in, sorted keys/positions out, CUB's temporary storage: all on `s`.
  const size_t bytes = static_cast<size_t>(count) * sizeof(int32_t);
  Storage keys(bytes, out.device(), &s), positions(bytes, out.device(), &s);
  Storage sorted_keys(bytes, out.device(), &s), sorted_positions(bytes, out.device(), &s);
  index_to_keys_kernel<<<static_cast<unsigned>((count + kThreads - 1) / kThreads), kThreads, 0, raw(s)>>>(
      static_cast<int32_t*>(keys.data()), static_cast<int32_t*>(positions.data()), index.data<int64_t>(), count);
  LOOM_CUDA_CHECK(cudaGetLastError());
  int end_bit = 1;
  while (end_bit < 31 && (int64_t{1} << end_bit) < n) ++end_bit;
  auto sort = [&](void* temp, size_t& temp_bytes) {
    LOOM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp, temp_bytes, static_cast<int32_t*>(keys.data()), static_cast<int32_t*>(sorted_keys.data()),
        static_cast<int32_t*>(positions.data()), static_cast<int32_t*>(sorted_positions.data()),
        static_cast<int>(count), 0, end_bit, raw(s)));
  };
  size_t temp_bytes = 0;
  sort(nullptr, temp_bytes);
  Storage temp(std::max<size_t>(temp_bytes, 1), out.device(), &s);
  sort(temp.data(), temp_bytes);
  dispatch_dtype(out.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    add_runs_kernel<T><<<static_cast<unsigned>(count), kThreads, 0, raw(s)>>>(
        static_cast<T*>(out.raw_data()), static_cast<const T*>(rows.raw_data()),
        static_cast<const int32_t*>(sorted_keys.data()), static_cast<const int32_t*>(sorted_positions.data()), count,
        cols);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void logsumexp_forward(Tensor& lse, const Tensor& x, Stream& s) {
  const char* op = "logsumexp_forward";
  check_matrix(x, s, op, "x");
  check_device_tensor(lse, s, op, "lse");
  LOOM_CHECK(lse.numel() == x.size(0) && lse.dtype() == DType::f32)
      << op << ": lse must be f32 with " << x.size(0) << " entries, got " << lse.dtype() << " "
      << shape_str(lse.shape());
  const int64_t rows = x.size(0), cols = x.size(1);
  if (rows == 0) return;
  dispatch_dtype(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    logsumexp_forward_kernel<T><<<row_warps_blocks(rows), kThreads, 0, raw(s)>>>(
        lse.data<float>(), static_cast<const T*>(x.raw_data()), rows, cols);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void logsumexp_backward(Tensor& grad_x, const Tensor& grad_lse, const Tensor& x, const Tensor& lse, Stream& s) {
  const char* op = "logsumexp_backward";
  check_matrix(x, s, op, "x");
  check_matrix(grad_x, s, op, "grad_x");
  check_device_tensor(grad_lse, s, op, "grad_lse");
  check_device_tensor(lse, s, op, "lse");
  LOOM_CHECK(grad_x.shape() == x.shape() && grad_x.dtype() == x.dtype() && grad_lse.numel() == x.size(0) &&
             lse.numel() == x.size(0) && grad_lse.dtype() == DType::f32 && lse.dtype() == DType::f32)
      << op << ": grad_x " << shape_str(grad_x.shape()) << " " << grad_x.dtype() << ", grad_lse "
      << shape_str(grad_lse.shape()) << " " << grad_lse.dtype() << ", lse " << shape_str(lse.shape()) << " "
      << lse.dtype() << " for x " << shape_str(x.shape()) << " " << x.dtype() << " (grad_lse and lse are f32)";
  const int64_t total = x.numel();
  if (total == 0) return;
  dispatch_dtype(x.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    logsumexp_backward_kernel<T><<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, raw(s)>>>(
        static_cast<T*>(grad_x.raw_data()), grad_lse.data<float>(), static_cast<const T*>(x.raw_data()),
        lse.data<float>(), x.size(0), x.size(1));
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

namespace {

void check_grouped(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, int64_t out_rows,
                   int64_t out_cols, const Stream& s, const char* op) {
  check_device_tensor(x, s, op, "x");
  check_device_tensor(w, s, op, "w");
  LOOM_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2) && x.dtype() == w.dtype())
      << op << ": x " << shape_str(x.shape()) << " " << x.dtype() << ", w " << shape_str(w.shape()) << " "
      << w.dtype() << " (need (S, In) and (E, Out, In) of one dtype)";
  LOOM_CHECK(static_cast<int64_t>(offsets.size()) == w.size(0) + 1 && offsets.front() == 0 &&
             offsets.back() == x.size(0))
      << op << ": " << offsets.size() << " offsets for " << w.size(0) << " experts and " << x.size(0) << " rows";
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    LOOM_CHECK(offsets[e] <= offsets[e + 1]) << op << ": offsets decrease at expert " << e << " (" << offsets[e]
                                             << " > " << offsets[e + 1] << ")";
  LOOM_CHECK(out_rows == x.size(0) && out_cols == w.size(1)) << op << ": output (" << out_rows << ", " << out_cols
                                                             << ") for x " << shape_str(x.shape()) << ", w "
                                                             << shape_str(w.shape());
}

}  // namespace

void grouped_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                            Stream& s) {
  const char* op = "grouped_linear_forward";
  check_device_tensor(y, s, op, "y");
  LOOM_CHECK(y.dim() == 2) << op << ": y must be (S, Out), got " << shape_str(y.shape());
  check_grouped(x, w, offsets, y.size(0), y.size(1), s, op);
  LOOM_CHECK(y.dtype() == x.dtype() || y.dtype() == DType::f32) << op << ": y dtype " << y.dtype() << " for x "
                                                                 << x.dtype();
  for (int64_t e = 0; e < w.size(0); ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    Tensor ye = y.narrow(0, offsets[e], n);  // (n, Out)
    gemm(ye, x.narrow(0, offsets[e], n), w.select(0, e), false, true, 1.0, 0.0, s);
  }
}

void grouped_linear_backward(Tensor& grad_x, Tensor& grad_w, const Tensor& grad_y, const Tensor& x, const Tensor& w,
                             const std::vector<int64_t>& offsets, Stream& s) {
  const char* op = "grouped_linear_backward";
  check_device_tensor(grad_y, s, op, "grad_y");
  LOOM_CHECK(grad_y.dim() == 2 && grad_y.dtype() == x.dtype())
      << op << ": grad_y " << shape_str(grad_y.shape()) << " " << grad_y.dtype() << " must be (S, Out) " << x.dtype();
  check_grouped(x, w, offsets, grad_y.size(0), grad_y.size(1), s, op);
  if (grad_x.defined()) {
    check_device_tensor(grad_x, s, op, "grad_x");
    LOOM_CHECK(grad_x.shape() == x.shape() && (grad_x.dtype() == x.dtype() || grad_x.dtype() == DType::f32))
        << op << ": grad_x " << shape_str(grad_x.shape()) << " " << grad_x.dtype() << " for x "
        << shape_str(x.shape()) << " " << x.dtype();
  }
  if (grad_w.defined()) {
    check_device_tensor(grad_w, s, op, "grad_w");
    LOOM_CHECK(grad_w.shape() == w.shape() && (grad_w.dtype() == w.dtype() || grad_w.dtype() == DType::f32))
        << op << ": grad_w " << shape_str(grad_w.shape()) << " " << grad_w.dtype() << " for w "
        << shape_str(w.shape()) << " " << w.dtype();
  }
  for (int64_t e = 0; e < w.size(0); ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (grad_w.defined()) {
      Tensor gw = grad_w.select(0, e);  // (Out, In)
      if (n == 0)
        LOOM_CUDA_CHECK(cudaMemsetAsync(gw.raw_data(), 0, gw.nbytes(), raw(s)));
      else
        gemm(gw, grad_y.narrow(0, offsets[e], n), x.narrow(0, offsets[e], n), true, false, 1.0, 0.0, s);
    }
    if (grad_x.defined() && n > 0) {
      Tensor gx = grad_x.narrow(0, offsets[e], n);  // (n, In)
      gemm(gx, grad_y.narrow(0, offsets[e], n), w.select(0, e), false, false, 1.0, 0.0, s);
    }
  }
}

namespace {
// The checks both top-k entries share: scores a device matrix, out on its device, k in [1, cols].
void check_topk(const Tensor& scores, const Tensor& out, int64_t k, const Stream& s, const char* op,
                const char* out_name) {
  check_matrix(scores, s, op, "scores");
  check_device_tensor(out, s, op, out_name);
  const int64_t cols = scores.size(1);
  LOOM_CHECK(k >= 1 && k <= cols) << op << ": k = " << k << " must lie in [1, " << cols << "]";
  LOOM_CHECK(cols < (int64_t{1} << 31)) << op << ": " << cols << " columns must fit int32";
}
}  // namespace

void topk_rows(Tensor& indices, const Tensor& scores, int64_t k, Stream& s) {
  const char* op = "topk_rows";
  check_topk(scores, indices, k, s, op, "indices");
  const int64_t rows = scores.size(0), cols = scores.size(1);
  LOOM_CHECK(indices.dtype() == DType::i64 && indices.shape() == (Shape{rows, k}))
      << op << ": indices must be i64 (" << rows << ", " << k << "), got " << indices.dtype() << " "
      << shape_str(indices.shape());
  if (rows == 0) return;
  const unsigned long long none = std::numeric_limits<unsigned long long>::max();
  Storage nan_at(sizeof(unsigned long long), scores.device(), &s);
  LOOM_CUDA_CHECK(cudaMemcpyAsync(nan_at.data(), &none, sizeof(none), cudaMemcpyHostToDevice, raw(s)));
  dispatch_dtype(scores.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    topk_kernel<T><<<row_warps_blocks(rows), kThreads, 0, raw(s)>>>(
        indices.data<int64_t>(), static_cast<unsigned long long*>(nan_at.data()),
        static_cast<const T*>(scores.raw_data()), rows, cols, k);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
  // One host sync to report a NaN score as the CPU twin does; the router reads
  // these indices on the host for its routing plan right after, so it costs no overlap.
  unsigned long long first_nan = none;
  LOOM_CUDA_CHECK(cudaMemcpyAsync(&first_nan, nan_at.data(), sizeof(first_nan), cudaMemcpyDeviceToHost, raw(s)));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(raw(s)));
  if (first_nan != none) {
    const int64_t at = static_cast<int64_t>(first_nan);
    LOOM_FAIL() << op << ": score (" << at / cols << ", " << at % cols << ") is NaN";
  }
}

void topk_mask_rows(Tensor& mask, const Tensor& scores, int64_t k, Stream& s) {
  const char* op = "topk_mask_rows";
  check_topk(scores, mask, k, s, op, "mask");
  const int64_t rows = scores.size(0), cols = scores.size(1);
  LOOM_CHECK(mask.dtype() == scores.dtype() && mask.shape() == scores.shape())
      << op << ": mask must be " << scores.dtype() << " " << shape_str(scores.shape()) << ", got " << mask.dtype()
      << " " << shape_str(mask.shape());
  if (rows == 0) return;
  dispatch_dtype(scores.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    topk_mask_kernel<T><<<row_warps_blocks(rows), kThreads, 0, raw(s)>>>(
        static_cast<T*>(mask.raw_data()), static_cast<const T*>(scores.raw_data()), rows, static_cast<int>(cols), k);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void moh_gate_rows(Tensor& gate, const Tensor& p, const Tensor& mask, const Tensor& z, int64_t shared, int64_t k,
                   Stream& s) {
  const char* op = "moh_gate_rows";
  moh::check_gate_operands(gate, p, mask, z, shared, k, op);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&gate, &p, &mask})
    check_device_tensor(*t, s, op, "operand");
  if (shared > 0) check_device_tensor(z, s, op, "z");
  const int64_t rows = p.size(0), e = p.size(1), zc = shared > 0 ? z.size(1) : 0;
  if (rows == 0) return;
  dispatch_f32_f64(p.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    moh_gate_kernel<T><<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0, raw(s)>>>(
        static_cast<T*>(gate.raw_data()), static_cast<const T*>(p.raw_data()), static_cast<const T*>(mask.raw_data()),
        shared > 0 ? static_cast<const T*>(z.raw_data()) : nullptr, rows, e, zc, shared, k);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void moh_gate_rows_backward(Tensor& dp, Tensor& dz, const Tensor& dgate, const Tensor& p, const Tensor& mask,
                            const Tensor& z, int64_t shared, int64_t k, Stream& s) {
  const char* op = "moh_gate_rows_backward";
  moh::check_gate_operands(dgate, p, mask, z, shared, k, op);
  LOOM_CHECK(dp.is_contiguous() && dp.shape() == p.shape() && dp.dtype() == p.dtype() &&
             (shared == 0 || (dz.is_contiguous() && dz.shape() == z.shape() && dz.dtype() == z.dtype())))
      << op << ": dp must be like p " << shape_str(p.shape()) << " and dz like z";
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dp, &dgate, &p, &mask})
    check_device_tensor(*t, s, op, "operand");
  if (shared > 0) {
    check_device_tensor(z, s, op, "z");
    check_device_tensor(dz, s, op, "dz");
  }
  const int64_t rows = p.size(0), e = p.size(1), zc = shared > 0 ? z.size(1) : 0;
  if (rows == 0) return;
  dispatch_f32_f64(p.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    moh_gate_backward_kernel<T><<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0, raw(s)>>>(
        static_cast<T*>(dp.raw_data()), shared > 0 ? static_cast<T*>(dz.raw_data()) : nullptr,
        static_cast<const T*>(dgate.raw_data()), static_cast<const T*>(p.raw_data()),
        static_cast<const T*>(mask.raw_data()), shared > 0 ? static_cast<const T*>(z.raw_data()) : nullptr, rows, e,
        zc, shared, k);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace loom::cuda
