// RMSNorm CPU kernels. The sum of squares is accumulated in double whatever
// the input dtype. The backward is one pass per row for dx (the row dot product
// sum(dy * w * x) then the update) and a per-thread partial for dw, reduced at
// the end, so threads never write the same dw entry.
#include "kernels/cpu/rmsnorm.h"

#include <omp.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace loom::cpu {

DType rmsnorm_rstd_dtype(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

namespace {

void check_cpu_contiguous(const Tensor& t, const char* op, const char* name) {
  LOOM_CHECK(t.defined()) << op << ": " << name << " is undefined";
  LOOM_CHECK(t.device().is_cpu()) << op << ": CPU kernel given " << name << " on " << t.device();
  LOOM_CHECK(t.is_contiguous()) << op << ": " << name << " must be contiguous, shape " << shape_str(t.shape())
                                << " strides " << shape_str(t.strides());
}

void check_rows(const Tensor& x, const Tensor& w, const char* op, int64_t& rows, int64_t& cols) {
  LOOM_CHECK(x.dim() >= 1) << op << ": x must have at least one dim, got shape " << shape_str(x.shape());
  LOOM_CHECK(w.dim() == 1 && w.size(0) == x.size(-1))
      << op << ": weight shape " << shape_str(w.shape()) << " does not match x " << shape_str(x.shape());
  LOOM_CHECK(w.dtype() == x.dtype()) << op << ": weight dtype " << w.dtype() << " differs from x " << x.dtype();
  cols = x.size(-1);
  rows = cols == 0 ? 0 : x.numel() / cols;
}

template <typename T, typename S>
void rmsnorm_forward_kernel(T* y, S* rstd, const T* x, const T* w, int64_t rows, int64_t cols, double eps) {
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    double sum_sq = 0.0;
    for (int64_t c = 0; c < cols; ++c) sum_sq += static_cast<double>(xr[c]) * static_cast<double>(xr[c]);
    double inv = 1.0 / std::sqrt(sum_sq / static_cast<double>(cols) + eps);
    rstd[r] = static_cast<S>(inv);
    for (int64_t c = 0; c < cols; ++c)
      yr[c] = static_cast<T>(static_cast<double>(xr[c]) * inv * static_cast<double>(w[c]));
  }
}

// y_c = x_c r w_c with r = (mean(x^2) + eps)^(-1/2), so
// dx_c = r w_c dy_c - x_c r^3 / C * sum_k(dy_k w_k x_k),   dw_c = sum_rows dy_c x_c r.
template <typename T, typename S>
void rmsnorm_backward_kernel(T* dx, T* dw, const T* dy, const T* x, const T* w, const S* rstd, int64_t rows,
                             int64_t cols) {
  int threads = rows * cols > 32768 ? omp_get_max_threads() : 1;
  std::vector<double> dw_partial(static_cast<size_t>(threads) * cols, 0.0);
#pragma omp parallel num_threads(threads)
  {
    double* dw_local = dw_partial.data() + static_cast<size_t>(omp_get_thread_num()) * cols;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      const T* dyr = dy + r * cols;
      T* dxr = dx + r * cols;
      double inv = static_cast<double>(rstd[r]);
      double dot = 0.0;
      for (int64_t c = 0; c < cols; ++c)
        dot += static_cast<double>(dyr[c]) * static_cast<double>(w[c]) * static_cast<double>(xr[c]);
      double coeff = inv * inv * inv * dot / static_cast<double>(cols);
      for (int64_t c = 0; c < cols; ++c) {
        double xc = static_cast<double>(xr[c]), dyc = static_cast<double>(dyr[c]);
        dxr[c] = static_cast<T>(inv * static_cast<double>(w[c]) * dyc - xc * coeff);
        dw_local[c] += dyc * xc * inv;
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += dw_partial[static_cast<size_t>(t) * cols + c];
    dw[c] = static_cast<T>(total);
  }
}

}  // namespace

void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps, Stream& s) {
  (void)s;
  const char* op = "rmsnorm_forward";
  check_cpu_contiguous(y, op, "y");
  check_cpu_contiguous(rstd, op, "rstd");
  check_cpu_contiguous(x, op, "x");
  check_cpu_contiguous(w, op, "weight");
  int64_t rows = 0, cols = 0;
  check_rows(x, w, op, rows, cols);
  LOOM_CHECK(y.shape() == x.shape() && y.dtype() == x.dtype())
      << op << ": y " << shape_str(y.shape()) << " " << y.dtype() << ", expected " << shape_str(x.shape()) << " "
      << x.dtype();
  LOOM_CHECK(rstd.numel() == rows && rstd.dtype() == rmsnorm_rstd_dtype(x.dtype()))
      << op << ": rstd has " << rstd.numel() << " elements of " << rstd.dtype() << ", expected " << rows << " of "
      << rmsnorm_rstd_dtype(x.dtype());
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    rmsnorm_forward_kernel<T, S>(y.data<T>(), rstd.data<S>(), x.data<T>(), w.data<T>(), rows, cols, eps);
  });
}

void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Stream& s) {
  (void)s;
  const char* op = "rmsnorm_backward";
  check_cpu_contiguous(dx, op, "dx");
  check_cpu_contiguous(dw, op, "dw");
  check_cpu_contiguous(dy, op, "dy");
  check_cpu_contiguous(x, op, "x");
  check_cpu_contiguous(w, op, "weight");
  check_cpu_contiguous(rstd, op, "rstd");
  int64_t rows = 0, cols = 0;
  check_rows(x, w, op, rows, cols);
  LOOM_CHECK(dy.shape() == x.shape() && dy.dtype() == x.dtype())
      << op << ": dy " << shape_str(dy.shape()) << " " << dy.dtype() << ", expected " << shape_str(x.shape()) << " "
      << x.dtype();
  LOOM_CHECK(dx.shape() == x.shape() && dx.dtype() == x.dtype())
      << op << ": dx " << shape_str(dx.shape()) << ", expected " << shape_str(x.shape());
  LOOM_CHECK(dw.shape() == w.shape() && dw.dtype() == w.dtype())
      << op << ": dw " << shape_str(dw.shape()) << ", expected " << shape_str(w.shape());
  LOOM_CHECK(rstd.numel() == rows && rstd.dtype() == rmsnorm_rstd_dtype(x.dtype()))
      << op << ": rstd has " << rstd.numel() << " elements of " << rstd.dtype() << ", expected " << rows;
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    rmsnorm_backward_kernel<T, S>(dx.data<T>(), dw.data<T>(), dy.data<T>(), x.data<T>(), w.data<T>(), rstd.data<S>(),
                                  rows, cols);
  });
}

}  // namespace loom::cpu
