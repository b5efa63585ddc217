// Differentiable matrix products: batched matmul with broadcast batch dims and
// linear (x @ W^T + bias). Every product goes through dispatch::gemm (OpenBLAS
// on CPU, cuBLASLt on CUDA); with 16-bit weights on CUDA the weight gradient
// is produced in fp32 directly (fp32 accumulation, fp32 gradient buffers); transposes in
// the forward and backward are BLAS flags, and transposed views of the inputs
// are recognised and passed with the flag instead of being copied. A matmul
// whose b has no batch (the common activation @ weight case) runs as one GEMM
// over the stacked rows of a, forward and backward.
#include "framework/ops_tensor.h"

#include <algorithm>

#include "framework/op_checks.h"
#include "framework/stream.h"

namespace loom {

namespace {

// Number of matrices in t (..., R, C).
int64_t batch_count(const Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d + 2 < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Whether the last two dims of t are a row-major matrix BLAS can read in place
// (unit column stride, rows at least a row apart); mirrors cpu::gemm's check.
bool row_major_matrix(const Tensor& t) {
  int64_t rows = t.size(-2), cols = t.size(-1);
  if (cols > 1 && t.stride(-1) != 1) return false;
  return rows <= 1 || t.stride(-2) >= std::max<int64_t>(cols, 1);
}

// A GEMM operand: the stored matrices and whether BLAS reads them transposed.
struct Operand {
  Tensor stored;
  bool trans;
};

// op(t) for a logical (..., R, C) tensor of any layout: a transposed view is
// passed as its row-major original with the flag flipped; other layouts are copied.
Operand as_operand(const Tensor& t, bool trans) {
  if (row_major_matrix(t)) return {t, trans};
  Tensor flipped = t.transpose(-1, -2);
  if (row_major_matrix(flipped)) return {flipped, !trans};
  return {t.contiguous(), trans};
}

// The operand's matrices laid out over the full batch shape (stride 0 where
// broadcast); a plain matrix stays 2-D (the kernel reuses it for every batch).
Tensor over_batch(const Tensor& stored, const Shape& batch) {
  if (stored.dim() == 2) return stored;
  Shape shape = batch;
  shape.push_back(stored.size(-2));
  shape.push_back(stored.size(-1));
  return stored.expand(shape);
}

// The one matrix of a tensor whose batch dims are all 1, as a 2-D view.
Tensor only_matrix(Tensor t) {
  while (t.dim() > 2) t = t.select(0, 0);
  return t;
}

// c (batch..., M, N) = op(a) @ op(b), where a's and b's batch dims broadcast to `batch`.
Tensor product(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Shape& batch) {
  int64_t m = trans_a ? a.size(-1) : a.size(-2), n = trans_b ? b.size(-2) : b.size(-1);
  int64_t count = shape_numel(batch);
  Shape out_shape = batch;
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor c = Tensor::empty(out_shape, a.dtype(), a.device());  // (batch..., M, N)
  Stream& s = stream_for(a);
  if (!trans_a && count > 1 && batch_count(b) == 1 && batch_count(a) == count && a.is_contiguous()) {
    // Same b for every batch: one GEMM over a's rows stacked as (count * M, K).
    Tensor rows = a.view({count * m, a.size(-1)});
    Tensor c_rows = c.view({count * m, n});  // (count * M, N)
    Operand ob = as_operand(only_matrix(b), trans_b);
    dispatch::gemm(c_rows, rows, ob.stored, false, ob.trans, 1.0, 0.0, s);
    return c;
  }
  Operand oa = as_operand(a, trans_a), ob = as_operand(b, trans_b);
  dispatch::gemm(c, over_batch(oa.stored, batch), over_batch(ob.stored, batch), oa.trans, ob.trans, 1.0, 0.0, s);
  return c;
}

}  // namespace

Variable matmul(const Variable& a, const Variable& b) {
  const Tensor& ta = float_input("matmul", a, "a");
  const Tensor& tb = float_input("matmul", b, "b");
  LOOM_CHECK(ta.dim() >= 2 && tb.dim() >= 2) << "matmul: needs matrices (at least 2-D), got a "
                                             << shape_str(ta.shape()) << " and b " << shape_str(tb.shape());
  check_device("matmul", tb, "b", ta.device());
  LOOM_CHECK(ta.dtype() == tb.dtype()) << "matmul: dtypes differ, a " << shape_str(ta.shape()) << " " << ta.dtype()
                                       << " vs b " << shape_str(tb.shape()) << " " << tb.dtype();
  LOOM_CHECK(ta.size(-1) == tb.size(-2)) << "matmul: a " << shape_str(ta.shape()) << " @ b " << shape_str(tb.shape())
                                         << ": inner sizes " << ta.size(-1) << " and " << tb.size(-2) << " differ";
  Shape a_batch(ta.shape().begin(), ta.shape().end() - 2), b_batch(tb.shape().begin(), tb.shape().end() - 2);
  size_t nb = std::max(a_batch.size(), b_batch.size());
  for (size_t i = 0; i < nb; ++i) {
    int64_t da = i < nb - a_batch.size() ? 1 : a_batch[i - (nb - a_batch.size())];
    int64_t db = i < nb - b_batch.size() ? 1 : b_batch[i - (nb - b_batch.size())];
    LOOM_CHECK(da == db || da == 1 || db == 1) << "matmul: batch dims of a " << shape_str(ta.shape()) << " and b "
                                               << shape_str(tb.shape()) << " do not broadcast";
  }
  Shape batch = broadcast_shapes(a_batch, b_batch);
  Tensor out = product(ta, false, tb, false, batch);  // (batch..., M, N)

  bool need_a = a.requires_grad(), need_b = b.requires_grad();
  Tensor saved_a = need_b ? ta : Tensor(), saved_b = need_a ? tb : Tensor();
  Shape sa = ta.shape(), sb = tb.shape();
  return make_output(out, {a, b}, "matmul",
                     [need_a, need_b, saved_a, saved_b, sa, sb, batch](const std::vector<Tensor>& grads)
                         -> std::vector<Tensor> {
                       const Tensor& g = grads[0];  // (batch..., M, N)
                       if (!g.defined()) return {Tensor(), Tensor()};
                       Tensor ga, gb;
                       // dL/da = g @ b^T, summed over the batch dims a was broadcast along.
                       if (need_a) ga = reduce_to(product(g, false, saved_b, true, batch), sa);
                       if (need_b) {
                         int64_t count = shape_numel(batch);
                         int64_t m = sa[sa.size() - 2], k = sa.back(), n = sb.back();
                         if (count > 1 && batch_count(saved_b) == 1 && batch_count(saved_a) == count) {
                           // dL/db = sum over the batch of a^T @ g = (stacked a)^T @ (stacked g): one GEMM.
                           Tensor a_rows = saved_a.contiguous().view({count * m, k});
                           Tensor g_rows = g.contiguous().view({count * m, n});
                           Tensor gb2 = Tensor::empty({k, n}, g.dtype(), g.device());  // (K, N)
                           dispatch::gemm(gb2, a_rows, g_rows, true, false, 1.0, 0.0, stream_for(g));
                           gb = gb2.view(sb);
                         } else {
                           gb = reduce_to(product(saved_a, true, g, false, batch), sb);
                         }
                       }
                       return {ga, gb};
                     });
}

Variable linear(const Variable& x, const Variable& weight, const Variable& bias) {
  const Tensor& tx = float_input("linear", x, "x");
  const Tensor& tw = float_input("linear", weight, "weight");
  LOOM_CHECK(tw.dim() == 2) << "linear: weight must be (Out, In), got " << shape_str(tw.shape());
  LOOM_CHECK(tx.dim() >= 1 && tx.size(-1) == tw.size(1))
      << "linear: x " << shape_str(tx.shape()) << " does not end in In = " << tw.size(1) << " of weight "
      << shape_str(tw.shape());
  check_device("linear", tw, "weight", tx.device());
  LOOM_CHECK(tx.dtype() == tw.dtype()) << "linear: dtypes differ, x " << tx.dtype() << " vs weight " << tw.dtype();
  int64_t in = tw.size(1), out_features = tw.size(0);
  Tensor tb;
  if (bias.defined()) {
    tb = float_input("linear", bias, "bias");
    check_device("linear", tb, "bias", tx.device());
    LOOM_CHECK(tb.dim() == 1 && tb.size(0) == out_features)
        << "linear: bias " << shape_str(tb.shape()) << " does not match weight " << shape_str(tw.shape());
    LOOM_CHECK(tb.dtype() == tw.dtype()) << "linear: dtypes differ, bias " << tb.dtype() << " vs weight "
                                         << tw.dtype();
  }
  int64_t rows = 1;  // N: x's leading dims flattened
  for (int64_t d = 0; d + 1 < tx.dim(); ++d) rows *= tx.size(d);
  Tensor x_rows = tx.dim() == 2 ? tx : tx.reshape({rows, in});  // (N, In), a view when x is contiguous
  Tensor y_rows = Tensor::empty({rows, out_features}, tx.dtype(), tx.device());  // (N, Out)
  Stream& s = stream_for(tx);
  if (tb.defined()) y_rows.copy_(tb.expand({rows, out_features}));
  Operand ox = as_operand(x_rows, false), ow = as_operand(tw, true);
  dispatch::gemm(y_rows, ox.stored, ow.stored, ox.trans, ow.trans, 1.0, tb.defined() ? 1.0 : 0.0, s);
  Shape out_shape = tx.shape();
  out_shape.back() = out_features;
  Tensor y = y_rows.view(out_shape);  // (..., Out)

  bool need_x = x.requires_grad(), need_w = weight.requires_grad(), need_b = bias.requires_grad();
  Tensor saved_x = need_w ? x_rows : Tensor(), saved_w = need_x ? tw : Tensor();
  Shape sx = tx.shape();
  return make_output(
      y, {x, weight, bias}, "linear",
      [need_x, need_w, need_b, saved_x, saved_w, sx, rows, in, out_features](const std::vector<Tensor>& grads)
          -> std::vector<Tensor> {
        if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
        Tensor g_rows = grads[0].reshape({rows, out_features});  // (N, Out)
        Stream& s = stream_for(g_rows);
        Tensor gx, gw, gb;
        if (need_x) {  // dL/dx = g @ W
          Tensor gx_rows = Tensor::empty({rows, in}, g_rows.dtype(), g_rows.device());  // (N, In)
          Operand og = as_operand(g_rows, false), ow = as_operand(saved_w, false);
          dispatch::gemm(gx_rows, og.stored, ow.stored, og.trans, ow.trans, 1.0, 0.0, s);
          gx = gx_rows.view(sx);
        }
        if (need_w) {  // dL/dW = g^T @ x
          // fp32 straight from the fp32 accumulator when 16-bit weights sit on CUDA.
          DType gw_dtype = g_rows.device().is_cuda() ? stats_dtype(g_rows.dtype()) : g_rows.dtype();
          gw = Tensor::empty({out_features, in}, gw_dtype, g_rows.device());  // (Out, In)
          Operand og = as_operand(g_rows, true), ox = as_operand(saved_x, false);
          dispatch::gemm(gw, og.stored, ox.stored, og.trans, ox.trans, 1.0, 0.0, s);
        }
        if (need_b) {  // dL/dbias = g summed over rows
          Tensor g_contig = g_rows.contiguous();
          gb = Tensor::empty({out_features}, g_rows.dtype(), g_rows.device());  // (Out)
          dispatch::sum_dim(gb, g_contig, 0, s);
        }
        return {gx, gw, gb};
      });
}

Variable linear_wide_out(const Variable& x, const Variable& weight) {
  const Tensor& tx = float_input("linear_wide_out", x, "x");
  const Tensor& tw = float_input("linear_wide_out", weight, "weight");
  LOOM_CHECK(tw.dtype() == DType::f32 || tw.dtype() == DType::f64)
      << "linear_wide_out: weight must be f32 or f64, got " << tw.dtype();
  if (!(is_16bit_float(tx.dtype()) && tx.device().is_cuda() && tw.dtype() == DType::f32))
    return linear(cast(x, tw.dtype()), weight);
  LOOM_CHECK(tw.dim() == 2 && tx.dim() >= 1 && tx.size(-1) == tw.size(1))
      << "linear_wide_out: x " << shape_str(tx.shape()) << " and weight " << shape_str(tw.shape())
      << " (Out, In) do not match";
  check_device("linear_wide_out", tw, "weight", tx.device());
  const int64_t in = tw.size(1), out_features = tw.size(0);
  int64_t rows = 1;  // N: x's leading dims flattened
  for (int64_t d = 0; d + 1 < tx.dim(); ++d) rows *= tx.size(d);
  Tensor x_rows = tx.reshape({rows, in});  // (N, In)
  Tensor w_low = tw.to(tx.dtype());        // (Out, In), x's dtype
  Tensor y_rows = Tensor::empty({rows, out_features}, DType::f32, tx.device());  // (N, Out)
  Stream& s = stream_for(tx);
  Operand ox = as_operand(x_rows, false), ow = as_operand(w_low, true);
  dispatch::gemm(y_rows, ox.stored, ow.stored, ox.trans, ow.trans, 1.0, 0.0, s);
  Shape out_shape = tx.shape();
  out_shape.back() = out_features;

  const bool need_x = x.requires_grad(), need_w = weight.requires_grad();
  Tensor saved_x = need_w ? x_rows : Tensor(), saved_w = need_x ? w_low : Tensor();
  const Shape sx = tx.shape();
  return make_output(
      y_rows.view(out_shape), {x, weight}, "linear_wide_out",
      [need_x, need_w, saved_x, saved_w, sx, rows, in, out_features](const std::vector<Tensor>& grads)
          -> std::vector<Tensor> {
        if (!grads[0].defined()) return {Tensor(), Tensor()};
        const DType low = need_x ? saved_w.dtype() : saved_x.dtype();
        Tensor g_rows = grads[0].reshape({rows, out_features}).to(low);  // (N, Out), x's dtype
        Stream& s = stream_for(g_rows);
        Tensor gx, gw;
        if (need_x) {  // dL/dx = g @ W, in x's dtype
          Tensor gx_rows = Tensor::empty({rows, in}, low, g_rows.device());  // (N, In)
          Operand og = as_operand(g_rows, false), ow = as_operand(saved_w, false);
          dispatch::gemm(gx_rows, og.stored, ow.stored, og.trans, ow.trans, 1.0, 0.0, s);
          gx = gx_rows.view(sx);
        }
        if (need_w) {  // dL/dW = g^T @ x, fp32 from the accumulator
          gw = Tensor::empty({out_features, in}, DType::f32, g_rows.device());  // (Out, In)
          Operand og = as_operand(g_rows, true), ox = as_operand(saved_x, false);
          dispatch::gemm(gw, og.stored, ox.stored, og.trans, ox.trans, 1.0, 0.0, s);
        }
        return {gx, gw};
      });
}

}  // namespace loom
