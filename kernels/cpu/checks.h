// Argument checks shared by the CPU kernels (errors name the op, the operand and the values).
#pragma once

#include "framework/tensor.h"

namespace loom::cpu {

// `t` must be a defined, contiguous CPU tensor.
inline void check_operand(const Tensor& t, const char* op, const char* name) {
  LOOM_CHECK(t.defined()) << op << ": " << name << " is undefined";
  LOOM_CHECK(t.device().is_cpu()) << op << ": CPU kernel given " << name << " on " << t.device();
  LOOM_CHECK(t.is_contiguous()) << op << ": " << name << " must be contiguous, shape " << shape_str(t.shape())
                                << " strides " << shape_str(t.strides());
}

// `t` must have `shape` and `dtype`.
inline void check_shape(const Tensor& t, const Shape& shape, DType dtype, const char* op, const char* name) {
  LOOM_CHECK(t.shape() == shape) << op << ": " << name << " shape " << shape_str(t.shape()) << ", expected "
                                 << shape_str(shape);
  LOOM_CHECK(t.dtype() == dtype) << op << ": " << name << " dtype " << t.dtype() << ", expected " << dtype;
}

// `t` must be a defined, contiguous CPU tensor with the shape and dtype of `like`.
inline void check_operand(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  LOOM_CHECK(t.defined()) << op << ": " << name << " is undefined";
  LOOM_CHECK(t.device().is_cpu()) << op << ": CPU kernel given " << name << " on " << t.device();
  LOOM_CHECK(t.is_contiguous()) << op << ": " << name << " must be contiguous, shape " << shape_str(t.shape())
                                << " strides " << shape_str(t.strides());
  LOOM_CHECK(t.shape() == like.shape()) << op << ": " << name << " shape " << shape_str(t.shape()) << " differs from "
                                        << shape_str(like.shape());
  LOOM_CHECK(t.dtype() == like.dtype()) << op << ": " << name << " dtype " << t.dtype() << " differs from "
                                        << like.dtype();
}

}  // namespace loom::cpu
