// Embedding forward/backward on CUDA (see embedding.h).
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/embedding.h"

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;

// Records the first out-of-range id (index of the slot) in *bad (initialized to N).
template <typename I>
__global__ void check_ids_kernel(int64_t* bad, const I* ids, int64_t n, int64_t vocab) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n && (ids[i] < 0 || ids[i] >= vocab)) atomicMin(reinterpret_cast<unsigned long long*>(bad), i);
}

template <typename T, typename I>
__global__ void gather_kernel(T* __restrict__ out, const T* __restrict__ weight, const I* __restrict__ ids,
                              int64_t cols) {
  const int64_t row = blockIdx.x;
  const T* src = weight + static_cast<int64_t>(ids[row]) * cols;
  T* dst = out + row * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// Block b handles sorted slot b when it starts a run of equal ids: it adds
// the run's gradient rows in token order into grad_weight[id].
template <typename T>
__global__ void accumulate_runs_kernel(float* __restrict__ grad_weight, const T* __restrict__ grad_out,
                                       const int32_t* __restrict__ sorted_ids, const int32_t* __restrict__ sorted_slots,
                                       int64_t n, int64_t cols) {
  const int64_t start = blockIdx.x;
  const int32_t id = sorted_ids[start];
  if (start > 0 && sorted_ids[start - 1] == id) return;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float sum = 0.f;
    for (int64_t j = start; j < n && sorted_ids[j] == id; ++j) sum += to_float(grad_out[sorted_slots[j] * cols + c]);
    grad_weight[static_cast<int64_t>(id) * cols + c] += sum;
  }
}

template <typename I>
__global__ void ids_to_int32_kernel(int32_t* out, int32_t* slots, const I* ids, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) {
    out[i] = static_cast<int32_t>(ids[i]);
    slots[i] = static_cast<int32_t>(i);
  }
}

// Throws naming the first id outside [0, vocab). One host sync: the check
// must finish before anything reads out of bounds.
void check_ids(const Tensor& ids, int64_t vocab, Stream& s, const char* op) {
  const int64_t n = ids.numel();
  if (n == 0) return;
  Storage bad(sizeof(int64_t), ids.device(), &s);
  int64_t none = n;
  LOOM_CUDA_CHECK(cudaMemcpyAsync(bad.data(), &none, sizeof(none), cudaMemcpyHostToDevice, raw(s)));
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (ids.dtype() == DType::i64)
    check_ids_kernel<int64_t><<<blocks, kThreads, 0, raw(s)>>>(static_cast<int64_t*>(bad.data()), ids.data<int64_t>(), n, vocab);
  else
    check_ids_kernel<int32_t><<<blocks, kThreads, 0, raw(s)>>>(static_cast<int64_t*>(bad.data()), ids.data<int32_t>(), n, vocab);
  LOOM_CUDA_CHECK(cudaGetLastError());
  int64_t first_bad = n;
  LOOM_CUDA_CHECK(cudaMemcpyAsync(&first_bad, bad.data(), sizeof(first_bad), cudaMemcpyDeviceToHost, raw(s)));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(raw(s)));
  if (first_bad < n) {
    Tensor one = ids.flatten().narrow(0, first_bad, 1).to(Device::cpu());
    LOOM_FAIL() << op << ": id " << static_cast<int64_t>(one.item()) << " at position " << first_bad
                << " is outside [0, " << vocab << ")";
  }
}

void check_ids_tensor(const Tensor& ids, const Stream& s, const char* op) {
  check_device_tensor(ids, s, op, "ids");
  LOOM_CHECK(ids.dtype() == DType::i64 || ids.dtype() == DType::i32) << op << ": ids must be i64 or i32, got "
                                                                     << ids.dtype();
}

}  // namespace

void embedding_forward(Tensor& out, const Tensor& weight, const Tensor& ids, Stream& s) {
  check_device_tensor(weight, s, "embedding_forward", "weight");
  check_device_tensor(out, s, "embedding_forward", "out");
  check_ids_tensor(ids, s, "embedding_forward");
  LOOM_CHECK(weight.dim() == 2 && out.dim() == 2 && out.size(0) == ids.numel() && out.size(1) == weight.size(1) &&
             out.dtype() == weight.dtype())
      << "embedding_forward: out " << shape_str(out.shape()) << " " << out.dtype() << " for weight "
      << shape_str(weight.shape()) << " " << weight.dtype() << " and " << ids.numel() << " ids";
  check_ids(ids, weight.size(0), s, "embedding_forward");
  const int64_t n = ids.numel(), cols = weight.size(1);
  if (n == 0 || cols == 0) return;
  LOOM_DISPATCH_CUDA_FLOAT(weight.dtype(), T, [&] {
    if (ids.dtype() == DType::i64)
      gather_kernel<T, int64_t><<<n, kThreads, 0, raw(s)>>>(static_cast<T*>(out.raw_data()),
                                                            static_cast<const T*>(weight.raw_data()),
                                                            ids.data<int64_t>(), cols);
    else
      gather_kernel<T, int32_t><<<n, kThreads, 0, raw(s)>>>(static_cast<T*>(out.raw_data()),
                                                            static_cast<const T*>(weight.raw_data()),
                                                            ids.data<int32_t>(), cols);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void embedding_backward(Tensor& grad_weight, const Tensor& grad_out, const Tensor& ids, Stream& s) {
  check_device_tensor(grad_weight, s, "embedding_backward", "grad_weight");
  check_device_tensor(grad_out, s, "embedding_backward", "grad_out");
  check_ids_tensor(ids, s, "embedding_backward");
  LOOM_CHECK(grad_weight.dtype() == DType::f32) << "embedding_backward: grad_weight must be f32 (fp32 gradient "
                                                   "buffers), got "
                                                << grad_weight.dtype();
  LOOM_CHECK(grad_weight.dim() == 2 && grad_out.dim() == 2 && grad_out.size(0) == ids.numel() &&
             grad_out.size(1) == grad_weight.size(1))
      << "embedding_backward: grad_out " << shape_str(grad_out.shape()) << " for grad_weight "
      << shape_str(grad_weight.shape()) << " and " << ids.numel() << " ids";
  const int64_t n = ids.numel(), cols = grad_weight.size(1), vocab = grad_weight.size(0);
  LOOM_CHECK(vocab < (int64_t{1} << 31) && n < (int64_t{1} << 31))
      << "embedding_backward: vocab " << vocab << " and " << n << " ids must fit int32";
  check_ids(ids, vocab, s, "embedding_backward");
  if (n == 0 || cols == 0) return;
  // keys/slots in, sorted keys/slots out, CUB's temporary storage: all on `s`.
  Storage keys(n * sizeof(int32_t), ids.device(), &s), slots(n * sizeof(int32_t), ids.device(), &s);
  Storage sorted_keys(n * sizeof(int32_t), ids.device(), &s), sorted_slots(n * sizeof(int32_t), ids.device(), &s);
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (ids.dtype() == DType::i64)
    ids_to_int32_kernel<int64_t><<<blocks, kThreads, 0, raw(s)>>>(static_cast<int32_t*>(keys.data()),
                                                                  static_cast<int32_t*>(slots.data()),
                                                                  ids.data<int64_t>(), n);
  else
    ids_to_int32_kernel<int32_t><<<blocks, kThreads, 0, raw(s)>>>(static_cast<int32_t*>(keys.data()),
                                                                  static_cast<int32_t*>(slots.data()),
                                                                  ids.data<int32_t>(), n);
  LOOM_CUDA_CHECK(cudaGetLastError());
  int end_bit = 1;
  while (end_bit < 31 && (int64_t{1} << end_bit) < vocab) ++end_bit;
  size_t temp_bytes = 0;
  LOOM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<int32_t*>(keys.data()),
                                                  static_cast<int32_t*>(sorted_keys.data()),
                                                  static_cast<int32_t*>(slots.data()),
                                                  static_cast<int32_t*>(sorted_slots.data()), static_cast<int>(n), 0,
                                                  end_bit, raw(s)));
  Storage temp(std::max<size_t>(temp_bytes, 1), ids.device(), &s);
  LOOM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data(), temp_bytes, static_cast<int32_t*>(keys.data()),
                                                  static_cast<int32_t*>(sorted_keys.data()),
                                                  static_cast<int32_t*>(slots.data()),
                                                  static_cast<int32_t*>(sorted_slots.data()), static_cast<int>(n), 0,
                                                  end_bit, raw(s)));
  LOOM_DISPATCH_CUDA_FLOAT(grad_out.dtype(), T, [&] {
    accumulate_runs_kernel<T><<<n, kThreads, 0, raw(s)>>>(
        grad_weight.data<float>(), static_cast<const T*>(grad_out.raw_data()),
        static_cast<const int32_t*>(sorted_keys.data()), static_cast<const int32_t*>(sorted_slots.data()), n, cols);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace loom::cuda
