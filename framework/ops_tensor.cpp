// Differentiable arithmetic (with numpy broadcasting) and sum/mean reductions.
// Each op is one autograd node; the backward of a broadcast operand sums the
// gradient back down to the operand's shape (cpu::sum_to). Matrix products
// live in ops_tensor_matmul.cpp, shape ops and embedding in ops_tensor_shape.cpp.
// Kernels run through kernels/dispatch.h on the inputs' device.
// Gradients returned by these ops are contiguous.
#include "framework/ops_tensor.h"

#include <algorithm>

#include "framework/op_checks.h"
#include "framework/stream.h"

namespace loom {

namespace {

Tensor binary_values(const Tensor& a, const Tensor& b, dispatch::BinaryOp op) {
  Tensor out = Tensor::empty(broadcast_shapes(a.shape(), b.shape()), a.dtype(), a.device());
  dispatch::binary(out, a, b, op, stream_for(a));
  return out;
}

Tensor scaled(const Tensor& x, double alpha) {
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  dispatch::scale(out, x, alpha, 0.0, stream_for(x));
  return out;
}

// The broadcast shape of two operands, or an error naming the op and both shapes.
Shape broadcast_for(const char* op, const Tensor& a, const Tensor& b) {
  const Shape &sa = a.shape(), &sb = b.shape();
  size_t n = std::max(sa.size(), sb.size());
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - sa.size() ? 1 : sa[i - (n - sa.size())];
    int64_t db = i < n - sb.size() ? 1 : sb[i - (n - sb.size())];
    LOOM_CHECK(da == db || da == 1 || db == 1)
        << op << ": shapes " << shape_str(sa) << " and " << shape_str(sb) << " do not broadcast (sizes " << da
        << " and " << db << " in dim " << i << " of the result)";
  }
  return broadcast_shapes(sa, sb);
}

Variable binary_op(const char* op, const Variable& a, const Variable& b, dispatch::BinaryOp kind) {
  LOOM_CHECK(a.defined() && b.defined()) << op << ": input " << (a.defined() ? "b" : "a") << " is undefined";
  const Device device = op_device(a, b);
  Tensor ta = operand_on(op, a, "a", device);  // a host constant meeting a CUDA operand is uploaded
  Tensor tb = operand_on(op, b, "b", device);
  check_float(op, ta, "a");
  check_float(op, tb, "b");
  // Mixed precision: a 16-bit operand meets an fp32 one (an fp32 loss plus a
  // bf16 auxiliary loss): compute in fp32. The engine hands the 16-bit
  // operand's gradient back in its own dtype. Any other mix is an error.
  if (ta.dtype() != tb.dtype() && (is_16bit_float(ta.dtype()) || is_16bit_float(tb.dtype())) &&
      (ta.dtype() == DType::f32 || tb.dtype() == DType::f32)) {
    ta = ta.to(DType::f32);
    tb = tb.to(DType::f32);
  }
  LOOM_CHECK(ta.dtype() == tb.dtype()) << op << ": dtypes differ, a " << shape_str(ta.shape()) << " " << ta.dtype()
                                       << " vs b " << shape_str(tb.shape()) << " " << tb.dtype();
  broadcast_for(op, ta, tb);
  Tensor out = binary_values(ta, tb, kind);  // broadcast shape of a and b
  bool need_a = a.requires_grad(), need_b = b.requires_grad();
  Shape sa = ta.shape(), sb = tb.shape();
  BackwardFn backward;
  switch (kind) {
    case dispatch::BinaryOp::add:
    case dispatch::BinaryOp::sub: {
      double sign_b = kind == dispatch::BinaryOp::add ? 1.0 : -1.0;
      backward = [need_a, need_b, sa, sb, sign_b](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor& g = grads[0];
        if (!g.defined()) return {Tensor(), Tensor()};
        Tensor ga = need_a ? reduce_to(g, sa) : Tensor();
        Tensor gb;
        if (need_b) gb = sign_b > 0 ? reduce_to(g, sb) : scaled(reduce_to(g, sb), -1.0);
        return {ga, gb};
      };
      break;
    }
    case dispatch::BinaryOp::mul: {
      // d(a*b)/da = b, d(a*b)/db = a: keep only the operand the other gradient needs.
      Tensor saved_a = need_b ? ta : Tensor(), saved_b = need_a ? tb : Tensor();
      backward = [need_a, need_b, sa, sb, saved_a, saved_b](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor& g = grads[0];
        if (!g.defined()) return {Tensor(), Tensor()};
        Tensor ga = need_a ? reduce_to(binary_values(g, saved_b, dispatch::BinaryOp::mul), sa) : Tensor();
        Tensor gb = need_b ? reduce_to(binary_values(g, saved_a, dispatch::BinaryOp::mul), sb) : Tensor();
        return {ga, gb};
      };
      break;
    }
    case dispatch::BinaryOp::div: {
      // d(a/b)/da = 1/b, d(a/b)/db = -a/b^2 = -(a/b)/b: g/b serves both.
      Tensor saved_out = need_b ? out : Tensor();
      backward = [need_a, need_b, sa, sb, tb, saved_out](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
        const Tensor& g = grads[0];
        if (!g.defined()) return {Tensor(), Tensor()};
        Tensor g_over_b = binary_values(g, tb, dispatch::BinaryOp::div);  // broadcast shape
        Tensor ga = need_a ? reduce_to(g_over_b, sa) : Tensor();
        Tensor gb;
        if (need_b) gb = scaled(reduce_to(binary_values(g_over_b, saved_out, dispatch::BinaryOp::mul), sb), -1.0);
        return {ga, gb};
      };
      break;
    }
  }
  return make_output(out, {a, b}, op, std::move(backward));
}

// g (the reduced shape, or any shape that broadcasts to `shape`) spread back
// over `shape` and multiplied by alpha (1 for sum, 1/n for mean).
Tensor spread_back(const Tensor& g, const Shape& shape, double alpha) {
  Tensor out = Tensor::empty(shape, g.dtype(), g.device());
  dispatch::scale(out, g.expand(shape), alpha, 0.0, stream_for(g));
  return out;
}

Variable reduce_all(const char* op, const Variable& x, bool mean) {
  const Tensor& t = float_input(op, x, "x");
  Tensor out = Tensor::empty({}, t.dtype(), t.device());  // ()
  dispatch::sum_all(out, t.contiguous(), stream_for(t));
  double alpha = mean ? 1.0 / static_cast<double>(t.numel()) : 1.0;
  if (mean) dispatch::scale(out, out, alpha, 0.0, stream_for(t));
  Shape shape = t.shape();
  return make_output(out, {x}, op, [shape, alpha](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    return {spread_back(grads[0], shape, alpha)};
  });
}

Variable reduce_dim(const char* op, const Variable& x, int64_t dim, bool keepdim, bool mean) {
  const Tensor& t = float_input(op, x, "x");
  LOOM_CHECK(dim >= -t.dim() && dim < t.dim())
      << op << ": dim " << dim << " out of range for shape " << shape_str(t.shape());
  int64_t d = dim < 0 ? dim + t.dim() : dim;
  Shape kept = t.shape();
  kept[d] = 1;
  Shape dropped = t.shape();
  dropped.erase(dropped.begin() + d);
  Tensor out = Tensor::empty(keepdim ? kept : dropped, t.dtype(), t.device());  // x's shape without (or with size 1 at) dim
  dispatch::sum_dim(out, t.contiguous(), d, stream_for(t));
  double alpha = mean ? 1.0 / static_cast<double>(t.size(d)) : 1.0;
  if (mean) dispatch::scale(out, out, alpha, 0.0, stream_for(t));
  Shape shape = t.shape();
  return make_output(out, {x}, op, [shape, kept, alpha](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    // The gradient has the output's shape; with dim put back as size 1 it broadcasts to x.
    return {spread_back(grads[0].reshape(kept), shape, alpha)};
  });
}

}  // namespace

// ---- arithmetic ----
Variable add(const Variable& a, const Variable& b) { return binary_op("add", a, b, dispatch::BinaryOp::add); }
Variable sub(const Variable& a, const Variable& b) { return binary_op("sub", a, b, dispatch::BinaryOp::sub); }
Variable mul(const Variable& a, const Variable& b) { return binary_op("mul", a, b, dispatch::BinaryOp::mul); }
Variable div(const Variable& a, const Variable& b) { return binary_op("div", a, b, dispatch::BinaryOp::div); }
Variable operator+(const Variable& a, const Variable& b) { return add(a, b); }
Variable operator-(const Variable& a, const Variable& b) { return sub(a, b); }
Variable operator*(const Variable& a, const Variable& b) { return mul(a, b); }

Variable scale(const Variable& x, double alpha) {
  const Tensor& t = float_input("scale", x, "x");
  Tensor out = scaled(t, alpha);  // x's shape
  return make_output(out, {x}, "scale", [alpha](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    return {scaled(grads[0], alpha)};
  });
}

// ---- reductions ----
Variable sum(const Variable& x) { return reduce_all("sum", x, false); }
Variable mean(const Variable& x) { return reduce_all("mean", x, true); }
Variable sum(const Variable& x, int64_t dim, bool keepdim) { return reduce_dim("sum", x, dim, keepdim, false); }
Variable mean(const Variable& x, int64_t dim, bool keepdim) { return reduce_dim("mean", x, dim, keepdim, true); }

}  // namespace loom
