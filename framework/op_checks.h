// Input checks, device placement and stream choice shared by the differentiable
// ops. Ops run where their data lives: outputs are allocated on the inputs'
// device and the numeric work goes through kernels/dispatch.h, which picks the
// CPU kernel or its CUDA twin (or fails naming the op when the CUDA twin does
// not exist yet).
#pragma once

#include "framework/autograd.h"
#include "framework/stream.h"
#include "kernels/dispatch.h"

namespace loom {

// Checks a floating op operand: on CPU f32 or f64 (the CPU kernels' types); on
// CUDA f32, bf16 or f16 storage (the CUDA kernels compute in fp32), or f64
// where a kernel supports it.
inline void check_float(const char* op, const Tensor& t, const char* name) {
  if (t.device().is_cpu()) {
    LOOM_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64)
        << op << ": input " << name << " " << shape_str(t.shape()) << " has dtype " << t.dtype()
        << "; f32 or f64 needed on cpu";
  } else {
    LOOM_CHECK(is_floating(t.dtype())) << op << ": input " << name << " " << shape_str(t.shape()) << " has dtype "
                                       << t.dtype() << "; a floating dtype (bf16, f16, f32) needed on "
                                       << t.device();
  }
}

// The data of an op input, checked: defined and floating (see check_float).
inline const Tensor& float_input(const char* op, const Variable& v, const char* name) {
  LOOM_CHECK(v.defined()) << op << ": input " << name << " is undefined";
  check_float(op, v.data(), name);
  return v.data();
}

// Where an op with operands a and b runs: the CUDA device when either is on one.
inline Device op_device(const Variable& a, const Variable& b) {
  return a.data().device().is_cuda() ? a.data().device() : b.data().device();
}

// The data of operand `v` on `device`: itself when it is there. A constant
// (no gradient) host operand is uploaded: models build small constants such as
// masks, load fractions and unit weights on the host. A host operand that
// needs a gradient, or one on another GPU, is an error naming both devices.
inline Tensor operand_on(const char* op, const Variable& v, const char* name, Device device) {
  LOOM_CHECK(v.defined()) << op << ": input " << name << " is undefined";
  const Tensor& t = v.data();
  if (t.device() == device) return t;
  LOOM_CHECK(t.device().is_cpu() && !v.requires_grad())
      << op << ": " << name << " " << shape_str(t.shape()) << " is on " << t.device()
      << (v.requires_grad() ? " and needs a gradient," : ",") << " but the op's other inputs are on " << device;
  return t.to(device);
}

// Checks that `t` is on `device` (all data operands of one op share a device).
inline void check_device(const char* op, const Tensor& t, const char* name, Device device) {
  LOOM_CHECK(t.device() == device) << op << ": " << name << " " << shape_str(t.shape()) << " is on " << t.device()
                                   << " but the op's other inputs are on " << device;
}

// An integer index tensor (ids, targets, positions) on `device`: itself when it
// is already there, else a copy (a host -> device upload is queued without a
// host wait, see framework/storage.cpp).
inline Tensor index_on(const Tensor& index, Device device) {
  return index.device() == device ? index : index.contiguous().to(device);
}

// True for the 16-bit floating dtypes that CUDA mixed precision stores.
inline bool is_16bit_float(DType dtype) { return dtype == DType::bf16 || dtype == DType::f16; }

// The dtype of statistics kept beside a tensor of `dtype` (lse, rstd, losses):
// f32 for 16-bit storage (DESIGN.md §3), else the dtype itself.
inline DType stats_dtype(DType dtype) { return is_16bit_float(dtype) ? DType::f32 : dtype; }

// The same check where only the validation is needed.
inline void check_input(const Variable& v, const char* op, const char* name) { (void)float_input(op, v, name); }

// Ops run on the default stream of their data's device.
inline Stream& stream_for(const Tensor& t) { return Stream::default_for(t.device()); }

// The gradient of an operand that was broadcast to g's shape: g summed down to `shape`.
inline Tensor reduce_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g.contiguous();
  Tensor out = Tensor::empty(shape, g.dtype(), g.device());
  dispatch::sum_to(out, g, stream_for(g));
  return out;
}

}  // namespace loom
