// Differentiable shape ops (reshape, transpose, permute, slice, narrow,
// concat, contiguous) and the embedding lookup. reshape/transpose/permute/
// slice/narrow return views of the input (shared storage); their backward
// puts the gradient back into the input's layout: the inverse view for
// transposes, a zero tensor with the gradient copied into the window for
// slices. Embedding gathers rows forward and scatter-adds them backward
// (kernels/dispatch.h: CPU or CUDA). Gradients returned by these ops are
// contiguous and on the input's device.
#include "framework/ops_tensor.h"

#include <algorithm>

#include "framework/op_checks.h"
#include "framework/stream.h"

namespace loom {

namespace {

// The data of an op input, checked: defined. Any dtype, any device (views and
// copies work on every device).
const Tensor& any_input(const char* op, const Variable& v) {
  LOOM_CHECK(v.defined()) << op << ": input is undefined";
  return v.data();
}

// `dim` (negative counts from the end) checked against t, naming the op and t's shape.
int64_t dim_of(const char* op, int64_t dim, const Tensor& t) {
  LOOM_CHECK(dim >= -t.dim() && dim < t.dim())
      << op << ": dim " << dim << " out of range for shape " << shape_str(t.shape());
  return dim < 0 ? dim + t.dim() : dim;
}

// Shape with one optional -1 resolved against t's element count.
Shape resolve_shape(const char* op, const Shape& shape, const Tensor& t) {
  Shape resolved = shape;
  int64_t infer = -1, known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      LOOM_CHECK(infer < 0) << op << ": more than one -1 in " << shape_str(shape);
      infer = static_cast<int64_t>(i);
    } else {
      LOOM_CHECK(shape[i] >= 0) << op << ": negative size in " << shape_str(shape);
      known *= shape[i];
    }
  }
  if (infer >= 0 && known > 0) resolved[infer] = t.numel() / known;
  LOOM_CHECK(shape_numel(resolved) == t.numel() && (infer < 0 || known > 0))
      << op << ": cannot reshape " << shape_str(t.shape()) << " (" << t.numel() << " elements) to "
      << shape_str(shape);
  return resolved;
}

}  // namespace

Variable reshape(const Variable& x, const Shape& shape) {
  const Tensor& t = any_input("reshape", x);
  Tensor out = t.reshape(resolve_shape("reshape", shape, t));  // a view when x is contiguous
  Shape sx = t.shape();
  return make_output(out, {x}, "reshape", [sx](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    return {grads[0].contiguous().view(sx)};
  });
}

Variable transpose(const Variable& x, int64_t dim0, int64_t dim1) {
  const Tensor& t = any_input("transpose", x);
  int64_t d0 = dim_of("transpose", dim0, t), d1 = dim_of("transpose", dim1, t);
  Tensor out = t.transpose(d0, d1);  // view, d0 and d1 swapped
  return make_output(out, {x}, "transpose", [d0, d1](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    return {grads[0].transpose(d0, d1).contiguous()};
  });
}

Variable permute(const Variable& x, const std::vector<int64_t>& order) {
  const Tensor& t = any_input("permute", x);
  LOOM_CHECK(static_cast<int64_t>(order.size()) == t.dim())
      << "permute: order " << shape_str(order) << " for shape " << shape_str(t.shape()) << " needs " << t.dim()
      << " dims";
  std::vector<int64_t> inverse(order.size(), -1);
  for (size_t i = 0; i < order.size(); ++i) {
    int64_t d = dim_of("permute", order[i], t);
    LOOM_CHECK(inverse[d] < 0) << "permute: dim " << d << " repeated in order " << shape_str(order);
    inverse[d] = static_cast<int64_t>(i);
  }
  Tensor out = t.permute(order);  // view, dim i of out is dim order[i] of x
  return make_output(out, {x}, "permute", [inverse](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    return {grads[0].permute(inverse).contiguous()};
  });
}

Variable slice(const Variable& x, int64_t dim, int64_t start, int64_t end, int64_t step) {
  const Tensor& t = any_input("slice", x);
  int64_t d = dim_of("slice", dim, t);
  int64_t n = t.size(d);
  int64_t first = start < 0 ? start + n : start, last = std::min(end < 0 ? end + n : end, n);
  LOOM_CHECK(step >= 1) << "slice: step " << step << " must be >= 1";
  LOOM_CHECK(first >= 0 && first <= last) << "slice: [" << start << ", " << end << ") out of range for dim " << d
                                          << " of shape " << shape_str(t.shape());
  Tensor out = t.slice(d, first, last, step);  // view
  Shape sx = t.shape();
  return make_output(out, {x}, "slice",
                     [sx, d, first, last, step](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
                       if (!grads[0].defined()) return {Tensor()};
                       Tensor gx = Tensor::zeros(sx, grads[0].dtype(), grads[0].device());
                       gx.slice(d, first, last, step).copy_(grads[0]);
                       return {gx};
                     });
}

Variable narrow(const Variable& x, int64_t dim, int64_t start, int64_t length) {
  const Tensor& t = any_input("narrow", x);
  int64_t d = dim_of("narrow", dim, t);
  LOOM_CHECK(start >= 0 && length >= 0 && start + length <= t.size(d))
      << "narrow: start " << start << ", length " << length << " out of range for dim " << d << " of shape "
      << shape_str(t.shape());
  Tensor out = t.narrow(d, start, length);  // view
  Shape sx = t.shape();
  return make_output(out, {x}, "narrow", [sx, d, start, length](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    Tensor gx = Tensor::zeros(sx, grads[0].dtype(), grads[0].device());
    gx.narrow(d, start, length).copy_(grads[0]);
    return {gx};
  });
}

Variable concat(const std::vector<Variable>& xs, int64_t dim) {
  LOOM_CHECK(!xs.empty()) << "concat: no inputs";
  const Tensor& first = any_input("concat", xs[0]);
  int64_t d = dim_of("concat", dim, first);
  Shape out_shape = first.shape();
  out_shape[d] = 0;
  std::vector<int64_t> offsets, sizes;
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& t = any_input("concat", xs[i]);
    check_device("concat", t, ("input " + std::to_string(i)).c_str(), first.device());
    LOOM_CHECK(t.dtype() == first.dtype()) << "concat: input " << i << " has dtype " << t.dtype() << ", input 0 "
                                           << first.dtype();
    bool match = t.dim() == first.dim();
    for (int64_t k = 0; match && k < t.dim(); ++k) match = k == d || t.size(k) == first.size(k);
    LOOM_CHECK(match) << "concat: input " << i << " has shape " << shape_str(t.shape()) << ", input 0 has "
                      << shape_str(first.shape()) << "; they must match except in dim " << d;
    offsets.push_back(out_shape[d]);
    sizes.push_back(t.size(d));
    out_shape[d] += t.size(d);
  }
  Tensor out = Tensor::empty(out_shape, first.dtype(), first.device());  // inputs' shape, dim d summed
  for (size_t i = 0; i < xs.size(); ++i) out.narrow(d, offsets[i], sizes[i]).copy_(xs[i].data());
  std::vector<bool> need(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) need[i] = xs[i].requires_grad();
  return make_output(out, xs, "concat", [d, offsets, sizes, need](const std::vector<Tensor>& grads) {
    std::vector<Tensor> gxs(offsets.size());
    if (!grads[0].defined()) return gxs;
    for (size_t i = 0; i < gxs.size(); ++i)
      if (need[i]) gxs[i] = grads[0].narrow(d, offsets[i], sizes[i]).contiguous();
    return gxs;
  });
}

Variable contiguous(const Variable& x) {
  const Tensor& t = any_input("contiguous", x);
  return make_output(t.contiguous(), {x}, "contiguous", [](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    return {grads[0].contiguous()};
  });
}

Variable cast(const Variable& x, DType dtype) {
  const Tensor& t = any_input("cast", x);
  LOOM_CHECK(is_floating(t.dtype()) && is_floating(dtype))
      << "cast: floating dtypes only, got " << t.dtype() << " -> " << dtype;
  if (t.dtype() == dtype) return x;
  const DType from = t.dtype();
  return make_output(t.to(dtype), {x}, "cast", [from](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
    if (!grads[0].defined()) return {Tensor()};
    return {grads[0].to(from)};
  });
}

Variable embedding(const Variable& weight, const Tensor& ids) {
  const Tensor& w = any_input("embedding", weight);
  LOOM_CHECK(w.dim() == 2 && is_floating(w.dtype()))
      << "embedding: weight must be a floating (V, C) table, got " << shape_str(w.shape()) << " " << w.dtype();
  LOOM_CHECK(ids.defined()) << "embedding: ids are undefined";
  LOOM_CHECK(ids.dtype() == DType::i64 || ids.dtype() == DType::i32)
      << "embedding: ids must be i64 or i32, got " << ids.dtype() << " " << shape_str(ids.shape());
  int64_t vocab = w.size(0), width = w.size(1), n = ids.numel();
  // Own copy on the weight's device: the backward must see the ids of this call.
  Tensor id = ids.device() == w.device() ? ids.clone() : index_on(ids, w.device());
  Tensor rows = Tensor::empty({n, width}, w.dtype(), w.device());  // (N, C)
  Stream& s = Stream::default_for(w.device());
  dispatch::embedding_forward(rows, w.contiguous(), id, s);
  Shape out_shape = ids.shape();
  out_shape.push_back(width);
  Tensor out = rows.view(out_shape);  // (..., C)
  return make_output(out, {weight}, "embedding",
                     [id, vocab, width, n](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
                       if (!grads[0].defined()) return {Tensor()};
                       Tensor g_rows = grads[0].contiguous().view({n, width});  // (N, C)
                       // CUDA accumulates the table gradient in fp32 (deterministic, DESIGN.md §3).
                       DType gw_dtype = g_rows.device().is_cuda() ? DType::f32 : g_rows.dtype();
                       Tensor gw = Tensor::zeros({vocab, width}, gw_dtype, g_rows.device());  // (V, C)
                       dispatch::embedding_backward(gw, g_rows, id, Stream::default_for(gw.device()));
                       return {gw};
                     });
}

}  // namespace loom
