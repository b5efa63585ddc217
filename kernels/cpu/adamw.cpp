// Fused AdamW step (see adamw.h for the formulas). The step-dependent factors
// (bias corrections, decay factor) are computed once in f64 and cast to the
// master's precision; the element loop is a single pass, threaded with OpenMP
// for large spans. Dtype dispatch happens once here: master f32/f64, grad any
// floating dtype, optional compute copy bf16/f16/f32.
#include "kernels/cpu/adamw.h"

#include <cmath>
#include <type_traits>

namespace loom::cpu {

namespace {

constexpr int64_t kParallelThreshold = 1 << 15;  // elements; below this threads cost more than they save

// Conversions through float for the 16-bit host containers.
template <typename To, typename From>
inline To convert(From x) {
  if constexpr (std::is_same_v<From, bf16> || std::is_same_v<From, f16>) {
    return static_cast<To>(static_cast<float>(x));
  } else if constexpr (std::is_same_v<To, bf16> || std::is_same_v<To, f16>) {
    return To(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

template <typename T>
struct StepFactors {
  T decay;         // 1 - lr * wd
  T beta1, one_minus_beta1;
  T beta2, one_minus_beta2;
  T step_size;     // lr / (1 - beta1^t)
  T inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^t)
  T eps;
};

// One pass over a flat span; C = void when there is no compute copy.
template <typename T, typename G, typename C>
void adamw_span(T* p, T* m, T* v, C* compute, const G* g, int64_t n, const StepFactors<T> f) {
#pragma omp parallel for schedule(static) if (n > kParallelThreshold)
  for (int64_t i = 0; i < n; ++i) {
    T grad = convert<T>(g[i]);
    T mi = f.beta1 * m[i] + f.one_minus_beta1 * grad;
    T vi = f.beta2 * v[i] + f.one_minus_beta2 * grad * grad;
    T pi = p[i] * f.decay;
    pi -= f.step_size * mi / (std::sqrt(vi) * f.inv_bc2_sqrt + f.eps);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if constexpr (!std::is_void_v<C>) compute[i] = convert<C>(pi);
  }
}

void check_span(const Tensor& t, int64_t numel, const char* name) {
  LOOM_CHECK(t.defined()) << "adamw_step: " << name << " is undefined";
  LOOM_CHECK(t.device().is_cpu()) << "adamw_step: CPU kernel got " << name << " on " << t.device();
  LOOM_CHECK(t.is_contiguous()) << "adamw_step: " << name << " must be contiguous, shape " << shape_str(t.shape())
                                << " strides " << shape_str(t.strides());
  LOOM_CHECK(t.numel() == numel) << "adamw_step: " << name << " has " << t.numel() << " elements "
                                 << shape_str(t.shape()) << ", the master param has " << numel;
}

template <typename T, typename G>
void dispatch_compute(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                      const StepFactors<T>& f) {
  T* p = param.data<T>();
  T* m = exp_avg.data<T>();
  T* v = exp_avg_sq.data<T>();
  const G* g = grad.data<G>();
  int64_t n = param.numel();
  if (!compute.defined()) return adamw_span<T, G, void>(p, m, v, nullptr, g, n, f);
  switch (compute.dtype()) {
    case DType::bf16: return adamw_span<T, G, bf16>(p, m, v, compute.data<bf16>(), g, n, f);
    case DType::f16: return adamw_span<T, G, f16>(p, m, v, compute.data<f16>(), g, n, f);
    case DType::f32: return adamw_span<T, G, float>(p, m, v, compute.data<float>(), g, n, f);
    default: LOOM_FAIL() << "adamw_step: compute copy dtype " << compute.dtype() << " is not supported (bf16, f16, f32)";
  }
}

template <typename T>
void dispatch_grad(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                   const StepFactors<T>& f) {
  switch (grad.dtype()) {
    case DType::f64: return dispatch_compute<T, double>(param, exp_avg, exp_avg_sq, compute, grad, f);
    case DType::f32: return dispatch_compute<T, float>(param, exp_avg, exp_avg_sq, compute, grad, f);
    case DType::bf16: return dispatch_compute<T, bf16>(param, exp_avg, exp_avg_sq, compute, grad, f);
    case DType::f16: return dispatch_compute<T, f16>(param, exp_avg, exp_avg_sq, compute, grad, f);
    default: LOOM_FAIL() << "adamw_step: grad dtype " << grad.dtype() << " is not floating";
  }
}

template <typename T>
StepFactors<T> step_factors(const AdamWScalars& s) {
  double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.step));
  double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.step));
  StepFactors<T> f;
  f.decay = static_cast<T>(1.0 - s.lr * s.weight_decay);
  f.beta1 = static_cast<T>(s.beta1);
  f.one_minus_beta1 = static_cast<T>(1.0 - s.beta1);
  f.beta2 = static_cast<T>(s.beta2);
  f.one_minus_beta2 = static_cast<T>(1.0 - s.beta2);
  f.step_size = static_cast<T>(s.lr / bc1);
  f.inv_bc2_sqrt = static_cast<T>(1.0 / std::sqrt(bc2));
  f.eps = static_cast<T>(s.eps);
  return f;
}

}  // namespace

void adamw_step(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                const AdamWScalars& scalars, Stream& s) {
  (void)s;  // CPU work is synchronous
  LOOM_CHECK(scalars.step >= 1) << "adamw_step: step " << scalars.step << " must be >= 1 (bias correction)";
  LOOM_CHECK(scalars.beta1 >= 0.0 && scalars.beta1 < 1.0 && scalars.beta2 >= 0.0 && scalars.beta2 < 1.0)
      << "adamw_step: beta1 " << scalars.beta1 << " and beta2 " << scalars.beta2 << " must lie in [0, 1)";
  check_span(param, param.numel(), "param");
  int64_t n = param.numel();
  check_span(exp_avg, n, "exp_avg");
  check_span(exp_avg_sq, n, "exp_avg_sq");
  check_span(grad, n, "grad");
  if (compute.defined()) {
    check_span(compute, n, "compute copy");
    LOOM_CHECK(!compute.shares_storage(param)) << "adamw_step: the compute copy must not alias the master param";
  }
  LOOM_CHECK(exp_avg.dtype() == param.dtype() && exp_avg_sq.dtype() == param.dtype())
      << "adamw_step: exp_avg " << exp_avg.dtype() << " and exp_avg_sq " << exp_avg_sq.dtype()
      << " must have the master param's dtype " << param.dtype();
  switch (param.dtype()) {
    case DType::f32: return dispatch_grad<float>(param, exp_avg, exp_avg_sq, compute, grad, step_factors<float>(scalars));
    case DType::f64:
      return dispatch_grad<double>(param, exp_avg, exp_avg_sq, compute, grad, step_factors<double>(scalars));
    default: LOOM_FAIL() << "adamw_step: master param dtype " << param.dtype() << " is not supported (f32, f64)";
  }
}

}  // namespace loom::cpu
