// Activation CPU kernels. SwiGLU is fused (one pass computes silu(gate) * up)
// so the MLP does not materialize silu(gate); its backward recomputes the
// sigmoid from gate instead of saving it. The sigmoid is evaluated in the
// overflow-free form (exp of a non-positive argument only).
#include "kernels/cpu/activation.h"
#include "kernels/cpu/checks.h"

#include <cmath>

namespace loom::cpu {

namespace {

constexpr int64_t kParallelThreshold = 1 << 15;  // elements; below this threads cost more than they save

template <typename T>
inline T stable_sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  T e = std::exp(x);
  return e / (T(1) + e);
}

// Runs fn(i) for every element index, threaded for large tensors.
template <typename Fn>
void for_each_element(int64_t n, Fn&& fn) {
#pragma omp parallel for schedule(static) if (n > kParallelThreshold)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace

void sigmoid_forward(Tensor& y, const Tensor& x, Stream& s) {
  (void)s;
  check_operand(x, x, "sigmoid_forward", "x");
  check_operand(y, x, "sigmoid_forward", "y");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* py = y.data<T>();
    const T* px = x.data<T>();
    for_each_element(x.numel(), [&](int64_t i) { py[i] = stable_sigmoid(px[i]); });
  });
}

void sigmoid_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s) {
  (void)s;
  check_operand(y, y, "sigmoid_backward", "y");
  check_operand(dy, y, "sigmoid_backward", "dy");
  check_operand(dx, y, "sigmoid_backward", "dx");
  LOOM_DISPATCH_FLOAT(y.dtype(), T, [&] {
    T* pdx = dx.data<T>();
    const T* pdy = dy.data<T>();
    const T* py = y.data<T>();
    for_each_element(y.numel(), [&](int64_t i) { pdx[i] = pdy[i] * py[i] * (T(1) - py[i]); });
  });
}

void silu_forward(Tensor& y, const Tensor& x, Stream& s) {
  (void)s;
  check_operand(x, x, "silu_forward", "x");
  check_operand(y, x, "silu_forward", "y");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* py = y.data<T>();
    const T* px = x.data<T>();
    for_each_element(x.numel(), [&](int64_t i) { py[i] = px[i] * stable_sigmoid(px[i]); });
  });
}

void silu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Stream& s) {
  (void)s;
  check_operand(x, x, "silu_backward", "x");
  check_operand(dy, x, "silu_backward", "dy");
  check_operand(dx, x, "silu_backward", "dx");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* pdx = dx.data<T>();
    const T* pdy = dy.data<T>();
    const T* px = x.data<T>();
    for_each_element(x.numel(), [&](int64_t i) {
      T sig = stable_sigmoid(px[i]);
      pdx[i] = pdy[i] * sig * (T(1) + px[i] * (T(1) - sig));
    });
  });
}

void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up, Stream& s) {
  (void)s;
  check_operand(gate, gate, "swiglu_forward", "gate");
  check_operand(up, gate, "swiglu_forward", "up");
  check_operand(out, gate, "swiglu_forward", "out");
  LOOM_DISPATCH_FLOAT(gate.dtype(), T, [&] {
    T* po = out.data<T>();
    const T* pg = gate.data<T>();
    const T* pu = up.data<T>();
    for_each_element(gate.numel(), [&](int64_t i) { po[i] = pg[i] * stable_sigmoid(pg[i]) * pu[i]; });
  });
}

void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up, Stream& s) {
  (void)s;
  check_operand(gate, gate, "swiglu_backward", "gate");
  check_operand(up, gate, "swiglu_backward", "up");
  check_operand(dout, gate, "swiglu_backward", "dout");
  check_operand(dgate, gate, "swiglu_backward", "dgate");
  check_operand(dup, gate, "swiglu_backward", "dup");
  LOOM_DISPATCH_FLOAT(gate.dtype(), T, [&] {
    T* pdg = dgate.data<T>();
    T* pdu = dup.data<T>();
    const T* pdo = dout.data<T>();
    const T* pg = gate.data<T>();
    const T* pu = up.data<T>();
    for_each_element(gate.numel(), [&](int64_t i) {
      T sig = stable_sigmoid(pg[i]);
      T silu = pg[i] * sig;
      pdg[i] = pdo[i] * pu[i] * sig * (T(1) + pg[i] * (T(1) - sig));
      pdu[i] = pdo[i] * silu;
    });
  });
}

namespace {

// z must hold one element per `span` elements of x, with x's dtype.
void check_gate(const Tensor& x, const Tensor& z, int64_t span, const char* op) {
  check_operand(x, op, "x");
  check_operand(z, op, "z");
  LOOM_CHECK(span >= 1 && z.numel() * span == x.numel())
      << op << ": z " << shape_str(z.shape()) << " with span " << span << " does not cover x " << shape_str(x.shape());
  LOOM_CHECK(z.dtype() == x.dtype()) << op << ": z dtype " << z.dtype() << " differs from x " << x.dtype();
}

}  // namespace

void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& z, int64_t span, Stream& s) {
  (void)s;
  check_gate(x, z, span, "sigmoid_gate_forward");
  check_operand(y, x, "sigmoid_gate_forward", "y");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* py = y.data<T>();
    const T* px = x.data<T>();
    const T* pz = z.data<T>();
    for_each_element(z.numel(), [&](int64_t r) {
      const T g = stable_sigmoid(pz[r]);
      for (int64_t i = r * span; i < (r + 1) * span; ++i) py[i] = px[i] * g;
    });
  });
}

void sigmoid_gate_backward(Tensor& dx, Tensor& dz, const Tensor& dy, const Tensor& x, const Tensor& z, int64_t span,
                           Stream& s) {
  (void)s;
  check_gate(x, z, span, "sigmoid_gate_backward");
  check_operand(dy, x, "sigmoid_gate_backward", "dy");
  check_operand(dx, x, "sigmoid_gate_backward", "dx");
  check_operand(dz, z, "sigmoid_gate_backward", "dz");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* pdx = dx.data<T>();
    T* pdz = dz.data<T>();
    const T* pdy = dy.data<T>();
    const T* px = x.data<T>();
    const T* pz = z.data<T>();
    for_each_element(z.numel(), [&](int64_t r) {
      const T g = stable_sigmoid(pz[r]);
      T sum = T(0);
      for (int64_t i = r * span; i < (r + 1) * span; ++i) {
        pdx[i] = pdy[i] * g;
        sum += pdy[i] * px[i];
      }
      pdz[r] = sum * g * (T(1) - g);
    });
  });
}

}  // namespace loom::cpu
