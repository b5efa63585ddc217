// Softmax CPU kernels, one row per iteration: the max-subtracted exponentials
// are written straight into y and normalized in place (two reads of x, no
// scratch); row sums are accumulated in double. The backward needs only y.
#include "kernels/cpu/softmax.h"
#include "kernels/cpu/checks.h"

#include <cmath>
#include <limits>

namespace loom::cpu {

namespace {

template <typename T>
void softmax_forward_kernel(T* y, const T* x, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    T row_max = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < cols; ++c) row_max = xr[c] > row_max ? xr[c] : row_max;
    // A row of all -inf has no finite maximum: subtract 0 instead (gives NaN like every framework's 0/0).
    if (!std::isfinite(row_max)) row_max = T(0);
    double total = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      T e = std::exp(xr[c] - row_max);
      yr[c] = e;
      total += static_cast<double>(e);
    }
    T inv = static_cast<T>(1.0 / total);
    for (int64_t c = 0; c < cols; ++c) yr[c] *= inv;
  }
}

template <typename T>
void softmax_backward_kernel(T* dx, const T* dy, const T* y, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* yr = y + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    double dot = 0.0;
    for (int64_t c = 0; c < cols; ++c) dot += static_cast<double>(dyr[c]) * static_cast<double>(yr[c]);
    T d = static_cast<T>(dot);
    for (int64_t c = 0; c < cols; ++c) dxr[c] = yr[c] * (dyr[c] - d);
  }
}

}  // namespace

void softmax_forward(Tensor& y, const Tensor& x, Stream& s) {
  (void)s;
  check_operand(x, x, "softmax_forward", "x");
  check_operand(y, x, "softmax_forward", "y");
  int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { softmax_forward_kernel<T>(y.data<T>(), x.data<T>(), rows, cols); });
}

void softmax_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s) {
  (void)s;
  check_operand(y, y, "softmax_backward", "y");
  check_operand(dy, y, "softmax_backward", "dy");
  check_operand(dx, y, "softmax_backward", "dx");
  int64_t cols = y.size(-1), rows = cols == 0 ? 0 : y.numel() / cols;
  LOOM_DISPATCH_FLOAT(y.dtype(), T,
                      [&] { softmax_backward_kernel<T>(dx.data<T>(), dy.data<T>(), y.data<T>(), rows, cols); });
}

}  // namespace loom::cpu
