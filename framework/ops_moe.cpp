// MoE dispatch ops (see ops_moe.h). index_select_rows and index_add_rows are a
// conjugate pair: each one's backward is the other's forward, on the same
// index, which the node keeps as its own copy (the caller may reuse its buffer)
// on the data's device. Kernels run through kernels/dispatch.h.
#include "framework/ops_moe.h"

#include "framework/op_checks.h"
#include "framework/stream.h"

namespace loom {

namespace {

const Tensor& floating_input(const char* op, const Variable& v) {
  LOOM_CHECK(v.defined()) << op << ": input is undefined";
  const Tensor& t = v.data();
  LOOM_CHECK(is_floating(t.dtype())) << op << ": input must be floating, got " << t.dtype();
  return t;
}

// A contiguous i64 (M) copy of `index` on `device`, checked for shape and dtype (values are checked by the kernels).
Tensor own_index(const char* op, const Tensor& index, int64_t m, Device device) {
  LOOM_CHECK(index.defined()) << op << ": index is undefined";
  LOOM_CHECK(index.dtype() == DType::i64 && index.dim() == 1 && (m < 0 || index.size(0) == m))
      << op << ": index must be i64 (" << (m < 0 ? std::string("M") : std::to_string(m)) << "), got "
      << index.dtype() << " " << shape_str(index.shape());
  return index.device() == device ? index.clone() : index_on(index, device);
}

Tensor gather(const Tensor& x, const Tensor& index) {
  Tensor xc = x.contiguous();
  Tensor out = Tensor::empty({index.numel(), xc.size(1)}, xc.dtype(), xc.device());  // (M, C)
  dispatch::index_select_rows(out, xc, index, Stream::default_for(xc.device()));
  return out;
}

Tensor scatter_add(const Tensor& rows, const Tensor& index, int64_t n) {
  Tensor rc = rows.contiguous();
  Tensor out = Tensor::zeros({n, rc.size(1)}, rc.dtype(), rc.device());  // (N, C)
  dispatch::index_add_rows(out, rc, index, Stream::default_for(rc.device()));
  return out;
}

}  // namespace

Variable index_select_rows(const Variable& x, const Tensor& index) {
  const char* op = "index_select_rows";
  const Tensor& xt = floating_input(op, x);
  LOOM_CHECK(xt.dim() == 2) << op << ": x must be (N, C), got " << shape_str(xt.shape());
  Tensor idx = own_index(op, index, -1, xt.device());
  int64_t n = xt.size(0);
  return make_output(gather(xt, idx), {x}, "IndexSelectRows", [idx, n](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
    return std::vector<Tensor>{scatter_add(grads[0], idx, n)};  // (N, C)
  });
}

Variable index_add_rows(const Variable& rows, const Tensor& index, int64_t n) {
  const char* op = "index_add_rows";
  const Tensor& rt = floating_input(op, rows);
  LOOM_CHECK(rt.dim() == 2) << op << ": rows must be (M, C), got " << shape_str(rt.shape());
  LOOM_CHECK(n >= 0) << op << ": n = " << n << " must be >= 0";
  Tensor idx = own_index(op, index, rt.size(0), rt.device());
  return make_output(scatter_add(rt, idx, n), {rows}, "IndexAddRows", [idx](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
    return std::vector<Tensor>{gather(grads[0], idx)};  // (M, C)
  });
}

Variable grouped_linear(const Variable& x, const Variable& weight, const std::vector<int64_t>& offsets) {
  const char* op = "grouped_linear";
  const Tensor& xt = floating_input(op, x);
  const Tensor& wt = floating_input(op, weight);
  check_device(op, wt, "weight", xt.device());
  LOOM_CHECK(xt.dim() == 2 && wt.dim() == 3) << op << ": x must be (S, In) and weight (E, Out, In), got "
                                             << shape_str(xt.shape()) << " and " << shape_str(wt.shape());
  Tensor xc = xt.contiguous(), wc = wt.contiguous();
  Tensor y = Tensor::empty({xc.size(0), wc.size(1)}, xc.dtype(), xc.device());  // (S, Out)
  dispatch::grouped_linear_forward(y, xc, wc, offsets, Stream::default_for(xc.device()));
  return make_output(y, {x, weight}, "GroupedLinear", [xc, wc, offsets](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
    Tensor gx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());  // (S, In)
    Tensor gw = Tensor::empty(wc.shape(), wc.dtype(), wc.device());  // (E, Out, In)
    dispatch::grouped_linear_backward(gx, gw, grads[0].contiguous(), xc, wc, offsets,
                                      Stream::default_for(xc.device()));
    return std::vector<Tensor>{gx, gw};
  });
}

Variable logsumexp(const Variable& x) {
  const char* op = "logsumexp";
  const Tensor& xt = floating_input(op, x);
  LOOM_CHECK(xt.dim() >= 1 && xt.size(-1) >= 1) << op << ": x must be (..., K) with K >= 1, got "
                                                << shape_str(xt.shape());
  Shape out_shape(xt.shape().begin(), xt.shape().end() - 1);
  int64_t k = xt.size(-1), rows = xt.numel() / k;
  Tensor x2 = xt.contiguous().view({rows, k});        // (N, K)
  Tensor lse = Tensor::empty({rows}, stats_dtype(xt.dtype()), xt.device());  // (N), fp32 for 16-bit x
  dispatch::logsumexp_forward(lse, x2, Stream::default_for(xt.device()));
  Shape in_shape = xt.shape();
  return make_output(lse.view(out_shape), {x}, "LogSumExp",
                     [x2, lse, in_shape, rows](const std::vector<Tensor>& grads) {
                       if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
                       Tensor g = grads[0].contiguous().view({rows});  // (N)
                       Tensor gx = Tensor::empty(x2.shape(), x2.dtype(), x2.device());  // (N, K)
                       dispatch::logsumexp_backward(gx, g, x2, lse, Stream::default_for(gx.device()));
                       return std::vector<Tensor>{gx.view(in_shape)};
                     });
}

Tensor topk_indices(const Tensor& scores, int64_t k) {
  LOOM_CHECK(scores.defined() && scores.dim() == 2)
      << "topk_indices: scores must be an (N, E) tensor, got "
      << (scores.defined() ? shape_str(scores.shape()) : std::string("undefined"));
  Tensor sc = scores.contiguous();
  Tensor out = Tensor::empty({sc.size(0), k}, DType::i64, sc.device());  // (N, k)
  dispatch::topk_rows(out, sc, k, Stream::default_for(sc.device()));
  return out;
}

Tensor topk_mask(const Tensor& scores, int64_t k) {
  LOOM_CHECK(scores.defined() && scores.dim() == 2)
      << "topk_mask: scores must be an (N, E) tensor, got "
      << (scores.defined() ? shape_str(scores.shape()) : std::string("undefined"));
  Tensor sc = scores.contiguous();
  Tensor out = Tensor::empty(sc.shape(), sc.dtype(), sc.device());  // (N, E)
  dispatch::topk_mask_rows(out, sc, k, Stream::default_for(sc.device()));
  return out;
}

Variable moh_gate(const Variable& p, const Tensor& mask, const Variable& z, int64_t shared, int64_t k) {
  const Tensor& tp = float_input("moh_gate", p, "p");
  LOOM_CHECK(tp.dim() == 2) << "moh_gate: p must be (N, E), got " << shape_str(tp.shape());
  LOOM_CHECK(shared == 0 || z.defined()) << "moh_gate: " << shared << " shared heads need z (N, h_s + 2)";
  Tensor pc = tp.contiguous(), mc = mask.defined() ? mask.contiguous() : Tensor();
  Tensor zc = shared > 0 ? float_input("moh_gate", z, "z").contiguous() : Tensor();
  Tensor gate = Tensor::empty({pc.size(0), shared + pc.size(1)}, pc.dtype(), pc.device());  // (N, shared + E)
  dispatch::moh_gate_rows(gate, pc, mc, zc, shared, k, Stream::default_for(pc.device()));
  const bool need_z = shared > 0 && z.requires_grad();
  return make_output(gate, {p, shared > 0 ? z : Variable()}, "MohGate",
                     [pc, mc, zc, shared, k, need_z](const std::vector<Tensor>& grads) -> std::vector<Tensor> {
                       if (!grads[0].defined()) return {Tensor(), Tensor()};
                       Tensor dg = grads[0].contiguous();
                       Tensor dp = Tensor::empty(pc.shape(), pc.dtype(), pc.device());  // (N, E)
                       Tensor dz = shared > 0 ? Tensor::empty(zc.shape(), zc.dtype(), zc.device()) : Tensor();
                       dispatch::moh_gate_rows_backward(dp, dz, dg, pc, mc, zc, shared, k,
                                                        Stream::default_for(pc.device()));
                       return {dp, need_z ? dz : Tensor()};
                     });
}

}  // namespace loom
