// Fused cross-entropy on CUDA (see cross_entropy.h).
// Forward: one warp or block per row (row_softmax.cuh) computes the row's
// (max, sum) in one read, writes lse and the row loss (fp32 scratch); one
// block then sums the row losses in a fixed order and counts the rows that
// are not ignored. Backward: one block counts the rows and forms the gradient
// scale from dloss on the device (no host read of dloss); then each row writes
// (exp(x - lse) - onehot) * scale in one read of the logits.
// Bad targets are recorded (first row, integer atomicMin) and skipped by the
// kernels, so nothing is read or written out of bounds before the host throws.
#include <cmath>
#include <memory>

#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/row_softmax.cuh"

namespace loom::cuda {

namespace {

using namespace rowwise;

constexpr int kFinalThreads = 1024;
constexpr unsigned long long kNoBadRow = ~0ull;

template <typename I>
__device__ __forceinline__ bool counted(I target, int64_t vocab, int64_t ignore_index) {
  return static_cast<int64_t>(target) != ignore_index && target >= 0 && static_cast<int64_t>(target) < vocab;
}

template <typename I>
__device__ __forceinline__ void note_bad_row(unsigned long long* bad, int64_t row, I target, int64_t vocab,
                                             int64_t ignore_index) {
  if (static_cast<int64_t>(target) != ignore_index && (target < 0 || static_cast<int64_t>(target) >= vocab))
    atomicMin(bad, static_cast<unsigned long long>(row));
}

template <typename T, typename I, typename L, bool kWarp, bool kVectorized>
__global__ void forward_rows_kernel(float* __restrict__ row_loss, L* __restrict__ lse, unsigned long long* bad,
                                    const T* __restrict__ logits, const I* __restrict__ targets, int64_t rows,
                                    int64_t vocab, int64_t ignore_index) {
  const RowSlot<kWarp> slot;
  if (slot.row >= rows) return;
  const T* xr = logits + slot.row * vocab;
  const OnlineSoftmax st = row_statistics<T, kWarp, kVectorized>(xr, vocab, slot.lane, slot.group);
  if (slot.lane != 0) return;
  const float row_lse = st.max + logf(st.sum);
  lse[slot.row] = from_float<L>(row_lse);
  const I t = targets[slot.row];
  note_bad_row(bad, slot.row, t, vocab, ignore_index);
  row_loss[slot.row] = counted(t, vocab, ignore_index) ? row_lse - to_float(xr[t]) : 0.f;
}

// One block: loss = sum of row losses (fixed order) / counted rows when `mean`.
template <typename I, typename O>
__global__ void forward_total_kernel(O* loss, const float* __restrict__ row_loss, const I* __restrict__ targets,
                                     int64_t rows, int64_t vocab, int64_t ignore_index, bool mean) {
  double sum = 0.0;
  long long count = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    sum += row_loss[r];
    count += counted(targets[r], vocab, ignore_index) ? 1 : 0;
  }
  sum = block_reduce(sum, SumOp{}, 0.0);
  count = block_reduce(count, SumOp{}, 0ll);
  if (threadIdx.x == 0) *loss = convert<O>(mean ? (count > 0 ? sum / static_cast<double>(count) : 0.0) : sum);
}

// One block: scale = dloss (/ counted rows when `mean`); records bad targets.
template <typename I, typename G>
__global__ void backward_scale_kernel(float* scale, unsigned long long* bad, const G* dloss,
                                      const I* __restrict__ targets, int64_t rows, int64_t vocab,
                                      int64_t ignore_index, bool mean) {
  long long count = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const I t = targets[r];
    note_bad_row(bad, r, t, vocab, ignore_index);
    count += counted(t, vocab, ignore_index) ? 1 : 0;
  }
  count = block_reduce(count, SumOp{}, 0ll);
  if (threadIdx.x != 0) return;
  const double g = static_cast<double>(to_float(*dloss));
  *scale = static_cast<float>(mean ? (count > 0 ? g / static_cast<double>(count) : 0.0) : g);
}

template <typename T, typename I, bool kWarp, bool kVectorized>
__global__ void backward_rows_kernel(T* __restrict__ dlogits, const T* __restrict__ logits,
                                     const I* __restrict__ targets, const float* __restrict__ lse,
                                     const float* __restrict__ scale, int64_t rows, int64_t vocab,
                                     int64_t ignore_index) {
  using A = RowAccess<T, kVectorized>;
  const RowSlot<kWarp> slot;
  if (slot.row >= rows) return;
  const int64_t base = slot.row * vocab;
  const I t = targets[slot.row];
  const bool live = counted(t, vocab, ignore_index);
  const int64_t target = live ? static_cast<int64_t>(t) : -1;
  const float g = live ? *scale : 0.f;
  const float l = lse[slot.row];
  for (int64_t i = slot.lane * A::N; i < vocab; i += slot.group * A::N) {
    float f[A::N];
    A::load(f, logits + base, i);
#pragma unroll
    for (int j = 0; j < A::N; ++j) f[j] = live ? __expf(f[j] - l) * g - (i + j == target ? g : 0.f) : 0.f;
    A::store(dlogits + base, i, f);
  }
}

void check_targets(const Tensor& targets, int64_t rows, const Stream& s, const char* op) {
  check_device_tensor(targets, s, op, "targets");
  LOOM_CHECK(targets.dtype() == DType::i64 || targets.dtype() == DType::i32)
      << op << ": targets must be i64 or i32, got " << targets.dtype();
  LOOM_CHECK(targets.shape() == Shape{rows}) << op << ": targets shape " << shape_str(targets.shape())
                                             << ", expected " << shape_str({rows}) << " for " << rows
                                             << " rows of logits";
}

void check_scalar(const Tensor& t, DType logits_dtype, const Stream& s, const char* op, const char* name) {
  check_device_tensor(t, s, op, name);
  LOOM_CHECK(t.shape().empty() && (t.dtype() == DType::f32 || t.dtype() == logits_dtype))
      << op << ": " << name << " must have shape () and dtype f32 or " << logits_dtype << ", got "
      << shape_str(t.shape()) << " " << t.dtype();
}

void check_lse(const Tensor& lse, int64_t rows, const Stream& s, const char* op) {
  check_device_tensor(lse, s, op, "lse");
  LOOM_CHECK(lse.shape() == Shape{rows} && lse.dtype() == DType::f32)
      << op << ": lse must be f32 of shape " << shape_str({rows}) << " (fp32 statistics), got "
      << shape_str(lse.shape()) << " " << lse.dtype();
}

void check_logits(const Tensor& logits, const Stream& s, const char* op) {
  check_device_tensor(logits, s, op, "logits");
  LOOM_CHECK(logits.dim() == 2) << op << ": logits must be (N, V), got shape " << shape_str(logits.shape());
}

// A one-word flag on the stream, set to "no bad row".
std::unique_ptr<Storage> make_flag(const Tensor& like, Stream& s) {
  auto flag = std::make_unique<Storage>(sizeof(unsigned long long), like.device(), &s);
  LOOM_CUDA_CHECK(cudaMemsetAsync(flag->data(), 0xff, sizeof(unsigned long long), raw(s)));
  return flag;
}

// Throws naming the first bad target. One host sync: a bad target must fail
// at this call, as on the CPU (the kernels have skipped it, so nothing was
// touched out of bounds).
void throw_on_bad_target(const Storage& flag, const Tensor& targets, int64_t vocab, int64_t ignore_index,
                         Stream& s, const char* op) {
  unsigned long long first = kNoBadRow;
  LOOM_CUDA_CHECK(cudaMemcpyAsync(&first, flag.data(), sizeof(first), cudaMemcpyDeviceToHost, raw(s)));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(raw(s)));
  if (first == kNoBadRow) return;
  const int64_t row = static_cast<int64_t>(first);
  const Tensor one = targets.narrow(0, row, 1).to(Device::cpu());
  LOOM_FAIL() << op << ": target " << static_cast<int64_t>(one.item()) << " at row " << row << " is outside [0, "
              << vocab << ") (ignore_index " << ignore_index << ")";
}

template <typename Fn>
void dispatch_targets(DType dtype, Fn&& fn) {
  if (dtype == DType::i64) fn(int64_t{});
  else fn(int32_t{});
}

}  // namespace

void cross_entropy_forward(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int64_t ignore_index, bool mean, Stream& s) {
  const char* op = "cross_entropy_forward";
  check_logits(logits, s, op);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_targets(targets, rows, s, op);
  check_scalar(loss, logits.dtype(), s, op, "loss");
  check_lse(lse, rows, s, op);
  LOOM_CHECK(vocab > 0 || rows == 0) << op << ": logits " << shape_str(logits.shape()) << " have no classes";
  std::unique_ptr<Storage> flag = make_flag(logits, s);
  Storage row_loss(static_cast<size_t>(std::max<int64_t>(rows, 1)) * sizeof(float), logits.device(), &s);
  LOOM_DISPATCH_CUDA_FLOAT(logits.dtype(), T, [&] {
    dispatch_targets(targets.dtype(), [&](auto tag) {
      using I = decltype(tag);
      const T* xp = static_cast<const T*>(logits.raw_data());
      const I* tp = static_cast<const I*>(targets.raw_data());
      float* rl = static_cast<float*>(row_loss.data());
      auto* bad = static_cast<unsigned long long*>(flag->data());
      if (rows > 0) {
        with_row_config<T>(rows, vocab, {xp}, [&](auto warp, auto vec, int64_t blocks, int threads) {
          forward_rows_kernel<T, I, float, decltype(warp)::value, decltype(vec)::value>
              <<<blocks, threads, 0, raw(s)>>>(rl, lse.data<float>(), bad, xp, tp, rows, vocab, ignore_index);
        });
      }
      LOOM_DISPATCH_CUDA_FLOAT(loss.dtype(), O, [&] {
        forward_total_kernel<I, O><<<1, kFinalThreads, 0, raw(s)>>>(static_cast<O*>(loss.raw_data()), rl, tp, rows,
                                                                   vocab, ignore_index, mean);
        LOOM_CUDA_CHECK(cudaGetLastError());
      });
    });
  });
  throw_on_bad_target(*flag, targets, vocab, ignore_index, s, op);
}

void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, int64_t ignore_index, bool mean, Stream& s) {
  const char* op = "cross_entropy_backward";
  check_logits(logits, s, op);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_targets(targets, rows, s, op);
  check_device_tensor(dlogits, s, op, "dlogits");
  LOOM_CHECK(dlogits.shape() == logits.shape() && dlogits.dtype() == logits.dtype())
      << op << ": dlogits " << shape_str(dlogits.shape()) << " " << dlogits.dtype() << ", expected "
      << shape_str(logits.shape()) << " " << logits.dtype();
  check_scalar(dloss, logits.dtype(), s, op, "dloss");
  check_lse(lse, rows, s, op);
  if (rows == 0) return;
  std::unique_ptr<Storage> flag = make_flag(logits, s);
  Storage scale(sizeof(float), logits.device(), &s);
  LOOM_DISPATCH_CUDA_FLOAT(logits.dtype(), T, [&] {
    dispatch_targets(targets.dtype(), [&](auto tag) {
      using I = decltype(tag);
      const I* tp = static_cast<const I*>(targets.raw_data());
      float* sp = static_cast<float*>(scale.data());
      LOOM_DISPATCH_CUDA_FLOAT(dloss.dtype(), G, [&] {
        backward_scale_kernel<I, G><<<1, kFinalThreads, 0, raw(s)>>>(
            sp, static_cast<unsigned long long*>(flag->data()), static_cast<const G*>(dloss.raw_data()), tp, rows,
            vocab, ignore_index, mean);
        LOOM_CUDA_CHECK(cudaGetLastError());
      });
      T* dp = static_cast<T*>(dlogits.raw_data());
      const T* xp = static_cast<const T*>(logits.raw_data());
      if (vocab > 0) {
        with_row_config<T>(rows, vocab, {dp, xp}, [&](auto warp, auto vec, int64_t blocks, int threads) {
          backward_rows_kernel<T, I, decltype(warp)::value, decltype(vec)::value><<<blocks, threads, 0, raw(s)>>>(
              dp, xp, tp, lse.data<float>(), sp, rows, vocab, ignore_index);
        });
      }
    });
  });
  throw_on_bad_target(*flag, targets, vocab, ignore_index, s, op);
}

}  // namespace loom::cuda
