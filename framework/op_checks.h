// Input checks and stream choice shared by the differentiable ops.
#pragma once

#include "framework/autograd.h"
#include "framework/stream.h"
#include "kernels/cpu/elementwise.h"

namespace loom {

// The data of an op input, checked: defined, on CPU (no CUDA kernels yet), floating (f32 or f64).
inline const Tensor& float_input(const char* op, const Variable& v, const char* name) {
  LOOM_CHECK(v.defined()) << op << ": input " << name << " is undefined";
  const Tensor& t = v.data();
  LOOM_CHECK(t.device().is_cpu()) << op << ": no CUDA kernel yet, tensor on " << t.device();
  LOOM_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64)
      << op << ": input " << name << " " << shape_str(t.shape()) << " has dtype " << t.dtype()
      << "; f32 or f64 needed";
  return t;
}

// The same check where only the validation is needed.
inline void check_input(const Variable& v, const char* op, const char* name) { (void)float_input(op, v, name); }

// Ops run on the default stream of their data's device.
inline Stream& stream_for(const Tensor& t) { return Stream::default_for(t.device()); }

// The gradient of an operand that was broadcast to g's shape: g summed down to `shape`.
inline Tensor reduce_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g.contiguous();
  Tensor out = Tensor::empty(shape, g.dtype());
  cpu::sum_to(out, g, stream_for(g));
  return out;
}

}  // namespace loom
