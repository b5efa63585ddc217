// RoPE CPU kernels. Forward and backward share one rotation routine (the
// backward rotates by -angle). Angles are computed in double from the integer
// positions, one cos/sin table per token reused across its H heads, so large
// positions keep full precision.
#include "kernels/cpu/rope.h"
#include "kernels/cpu/checks.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace loom::cpu {

namespace {

template <typename T, typename P>
void rope_kernel(T* y, const T* x, const P* positions, bool per_batch, int64_t B, int64_t T_, int64_t H, int64_t D,
                 double theta, double sign) {
  int64_t half = D / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(D));
#pragma omp parallel if (B * T_ * H * D > 32768)
  {
    std::vector<double> cos_table(half), sin_table(half);
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < B * T_; ++bt) {
      double pos = static_cast<double>(positions[per_batch ? bt : bt % T_]);
      for (int64_t i = 0; i < half; ++i) {
        double angle = pos * inv_freq[i];
        cos_table[i] = std::cos(angle);
        sin_table[i] = sign * std::sin(angle);
      }
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = x + (bt * H + h) * D;
        T* yr = y + (bt * H + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          double a = static_cast<double>(xr[i]), b = static_cast<double>(xr[i + half]);
          yr[i] = static_cast<T>(a * cos_table[i] - b * sin_table[i]);
          yr[i + half] = static_cast<T>(b * cos_table[i] + a * sin_table[i]);
        }
      }
    }
  }
}

void rope_apply(Tensor& y, const Tensor& x, const Tensor& positions, double theta, double sign, const char* op) {
  check_operand(x, x, op, "x");
  check_operand(y, x, op, "y");
  LOOM_CHECK(x.dim() == 4) << op << ": x must be (B, T, H, D), got shape " << shape_str(x.shape());
  int64_t B = x.size(0), T_ = x.size(1), H = x.size(2), D = x.size(3);
  LOOM_CHECK(D % 2 == 0) << op << ": head dim D = " << D << " must be even (rotate-half pairs i with i + D/2)";
  LOOM_CHECK(positions.defined() && positions.device().is_cpu() && positions.is_contiguous())
      << op << ": positions must be a contiguous CPU tensor";
  LOOM_CHECK(positions.dtype() == DType::i64 || positions.dtype() == DType::i32)
      << op << ": positions must be i64 or i32, got " << positions.dtype();
  bool per_token = positions.dim() == 1 && positions.size(0) == T_;
  bool per_batch = positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T_;
  LOOM_CHECK(per_token || per_batch) << op << ": positions shape " << shape_str(positions.shape())
                                     << " must be (T) with T = " << T_ << ", or (B, T) = "
                                     << shape_str({B, T_}) << " for x " << shape_str(x.shape());
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    if (positions.dtype() == DType::i64)
      rope_kernel<T, int64_t>(y.data<T>(), x.data<T>(), positions.data<int64_t>(), per_batch, B, T_, H, D, theta, sign);
    else
      rope_kernel<T, int32_t>(y.data<T>(), x.data<T>(), positions.data<int32_t>(), per_batch, B, T_, H, D, theta, sign);
  });
}

}  // namespace

void rope_forward(Tensor& y, const Tensor& x, const Tensor& positions, double theta, Stream& s) {
  (void)s;
  rope_apply(y, x, positions, theta, 1.0, "rope_forward");
}

void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& positions, double theta, Stream& s) {
  (void)s;
  rope_apply(dx, dy, positions, theta, -1.0, "rope_backward");
}

}  // namespace loom::cpu
