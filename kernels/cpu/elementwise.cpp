// Broadcasting element-wise kernels. Operands are walked through expanded
// (stride-0) views, so one loop serves every broadcast pattern; the innermost
// dimension is a tight loop.
#include "kernels/cpu/elementwise.h"

#include <vector>

namespace loom::cpu {

namespace {

// Calls fn(i_out, i_a, i_b) for each element of `shape` in row-major order,
// with element offsets under the given strides.
template <typename Fn>
void walk3(const Shape& shape, const Shape& sa, int64_t oa, const Shape& sb, int64_t ob, Fn&& fn) {
  int64_t n = shape_numel(shape);
  if (n == 0) return;
  int64_t nd = static_cast<int64_t>(shape.size());
  if (nd == 0) {
    fn(0, oa, ob);
    return;
  }
  int64_t inner = shape[nd - 1], ia_step = sa[nd - 1], ib_step = sb[nd - 1];
  std::vector<int64_t> idx(nd, 0);
  int64_t a = oa, b = ob;
  for (int64_t out = 0; out < n; out += inner) {
    for (int64_t j = 0; j < inner; ++j) fn(out + j, a + j * ia_step, b + j * ib_step);
    for (int64_t k = nd - 2; k >= 0; --k) {
      if (++idx[k] < shape[k]) {
        a += sa[k];
        b += sb[k];
        break;
      }
      a -= (shape[k] - 1) * sa[k];
      b -= (shape[k] - 1) * sb[k];
      idx[k] = 0;
    }
  }
}

void check_out(const Tensor& out, const Shape& shape, DType dtype, const char* op) {
  LOOM_CHECK(out.defined() && out.is_contiguous() && out.device().is_cpu())
      << op << ": output must be a contiguous CPU tensor";
  LOOM_CHECK(out.shape() == shape) << op << ": output shape " << shape_str(out.shape()) << ", expected "
                                   << shape_str(shape);
  LOOM_CHECK(out.dtype() == dtype) << op << ": output dtype " << out.dtype() << ", expected " << dtype;
}

}  // namespace

void binary(Tensor& out, const Tensor& a, const Tensor& b, BinaryOp op, Stream& s) {
  (void)s;
  LOOM_CHECK(a.dtype() == b.dtype()) << "binary op: dtypes differ, " << a.dtype() << " vs " << b.dtype();
  Shape shape = broadcast_shapes(a.shape(), b.shape());
  check_out(out, shape, a.dtype(), "binary op");
  Tensor ea = a.expand(shape), eb = b.expand(shape);
  LOOM_DISPATCH_FLOAT(a.dtype(), T, [&] {
    T* o = out.data<T>();
    const T* pa = static_cast<const T*>(a.storage()->data());
    const T* pb = static_cast<const T*>(b.storage()->data());
    auto run = [&](auto f) {
      walk3(shape, ea.strides(), ea.offset(), eb.strides(), eb.offset(),
            [&](int64_t io, int64_t ia, int64_t ib) { o[io] = f(pa[ia], pb[ib]); });
    };
    switch (op) {
      case BinaryOp::add: run([](T x, T y) { return x + y; }); break;
      case BinaryOp::sub: run([](T x, T y) { return x - y; }); break;
      case BinaryOp::mul: run([](T x, T y) { return x * y; }); break;
      case BinaryOp::div: run([](T x, T y) { return x / y; }); break;
    }
  });
}

void scale(Tensor& out, const Tensor& x, double alpha, double beta, Stream& s) {
  (void)s;
  check_out(out, x.shape(), x.dtype(), "scale");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* o = out.data<T>();
    const T* px = static_cast<const T*>(x.storage()->data());
    T al = static_cast<T>(alpha), be = static_cast<T>(beta);
    walk3(x.shape(), x.strides(), x.offset(), x.strides(), x.offset(),
          [&](int64_t io, int64_t ix, int64_t) { o[io] = al * px[ix] + be; });
  });
}

void axpy(Tensor& y, const Tensor& x, double alpha, Stream& s) {
  (void)s;
  check_out(y, x.shape(), x.dtype(), "axpy");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* py = y.data<T>();
    const T* px = static_cast<const T*>(x.storage()->data());
    T al = static_cast<T>(alpha);
    walk3(x.shape(), x.strides(), x.offset(), x.strides(), x.offset(),
          [&](int64_t iy, int64_t ix, int64_t) { py[iy] += al * px[ix]; });
  });
}

void sum_to(Tensor& out, const Tensor& x, Stream& s) {
  (void)s;
  LOOM_CHECK(broadcast_shapes(out.shape(), x.shape()) == x.shape())
      << "sum_to: " << shape_str(out.shape()) << " does not broadcast to " << shape_str(x.shape());
  LOOM_CHECK(out.is_contiguous() && out.dtype() == x.dtype()) << "sum_to: output must be contiguous " << x.dtype();
  // Walk x; the output index comes from an expanded view of out (stride 0 on summed dims).
  Tensor eo = out.expand(x.shape());
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* o = static_cast<T*>(out.storage()->data());
    const T* px = static_cast<const T*>(x.storage()->data());
    for (int64_t i = 0, n = out.numel(); i < n; ++i) o[out.offset() + i] = T(0);
    walk3(x.shape(), x.strides(), x.offset(), eo.strides(), eo.offset(),
          [&](int64_t, int64_t ix, int64_t io) { o[io] += px[ix]; });
  });
}

}  // namespace loom::cpu
