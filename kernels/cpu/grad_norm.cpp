// Sum of squares, in-place scale and non-finite count over flat spans (see
// grad_norm.h). The reductions walk fixed blocks of kBlock elements: blocks go
// to OpenMP threads, each block's partial is exact for its elements in order,
// and the partials are combined sequentially, which keeps the f64 result
// bit-identical across thread counts (useful when comparing runs).
#include "kernels/cpu/grad_norm.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace loom::cpu {

namespace {

constexpr int64_t kBlock = 1 << 14;               // elements per reduction block
constexpr int64_t kParallelThreshold = 1 << 15;  // elements; below this threads cost more than they save

template <typename T>
inline double to_double(T x) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
    return static_cast<double>(static_cast<float>(x));
  } else {
    return static_cast<double>(x);
  }
}

// Dispatch over the floating dtypes, including the 16-bit host containers.
template <typename Fn>
void dispatch_floating(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::f64: return fn(double{});
    case DType::f32: return fn(float{});
    case DType::bf16: return fn(bf16{});
    case DType::f16: return fn(f16{});
    default: LOOM_FAIL() << op << ": dtype " << dtype << " is not floating";
  }
}

void check_input(const Tensor& x, const char* op) {
  LOOM_CHECK(x.defined()) << op << ": input is undefined";
  LOOM_CHECK(x.device().is_cpu()) << op << ": CPU kernel got a tensor on " << x.device();
  LOOM_CHECK(x.is_contiguous()) << op << ": input must be contiguous, shape " << shape_str(x.shape()) << " strides "
                                << shape_str(x.strides());
}

void check_scalar_out(const Tensor& out, DType dtype, const char* op) {
  LOOM_CHECK(out.defined() && out.device().is_cpu() && out.numel() == 1 && out.dtype() == dtype)
      << op << ": output must be a one-element " << dtype << " CPU tensor, got "
      << (out.defined() ? shape_str(out.shape()) : std::string("undefined")) << " " << out.dtype();
}

// Sums per_element(x_i) (as double) over blocks; deterministic order.
template <typename T, typename Fn>
double blocked_sum(const T* x, int64_t n, Fn per_element) {
  int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
#pragma omp parallel for schedule(static) if (n > kParallelThreshold)
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t end = std::min(n, (b + 1) * kBlock);
    double acc = 0.0;
    for (int64_t i = b * kBlock; i < end; ++i) acc += per_element(to_double(x[i]));
    partial[static_cast<size_t>(b)] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

void sum_squares(Tensor& out, const Tensor& x, Stream& s) {
  (void)s;  // CPU work is synchronous
  check_input(x, "sum_squares");
  check_scalar_out(out, DType::f64, "sum_squares");
  double total = 0.0;
  dispatch_floating(x.dtype(), "sum_squares", [&](auto tag) {
    using T = decltype(tag);
    total = blocked_sum(x.data<T>(), x.numel(), [](double v) { return v * v; });
  });
  *out.data<double>() = total;
}

void scale_inplace(Tensor& x, double alpha, Stream& s) {
  (void)s;
  check_input(x, "scale_inplace");
  int64_t n = x.numel();
  dispatch_floating(x.dtype(), "scale_inplace", [&](auto tag) {
    using T = decltype(tag);
    T* px = x.data<T>();
    if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
      float a = static_cast<float>(alpha);
#pragma omp parallel for schedule(static) if (n > kParallelThreshold)
      for (int64_t i = 0; i < n; ++i) px[i] = T(static_cast<float>(px[i]) * a);
    } else {
      T a = static_cast<T>(alpha);
#pragma omp parallel for schedule(static) if (n > kParallelThreshold)
      for (int64_t i = 0; i < n; ++i) px[i] *= a;
    }
  });
}

void count_nonfinite(Tensor& out, const Tensor& x, Stream& s) {
  (void)s;
  check_input(x, "count_nonfinite");
  check_scalar_out(out, DType::i64, "count_nonfinite");
  double count = 0.0;
  dispatch_floating(x.dtype(), "count_nonfinite", [&](auto tag) {
    using T = decltype(tag);
    count = blocked_sum(x.data<T>(), x.numel(), [](double v) { return std::isfinite(v) ? 0.0 : 1.0; });
  });
  *out.data<int64_t>() = static_cast<int64_t>(count);
}

}  // namespace loom::cpu
