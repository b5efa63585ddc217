// Differentiable collectives (see sp_collectives.h). Collectives concatenate
// along dim 0, so ops along another dim move it to the front first; the
// communicator needs contiguous tensors, so everything is copied contiguous.
#include "parallel/sp_collectives.h"

#include "framework/error.h"

namespace loom::sp {
namespace {

Stream& stream_for(const Tensor& t) { return Stream::default_for(t.device()); }

int64_t checked_dim(const char* op, const Tensor& t, int64_t dim) {
  LOOM_CHECK(t.defined()) << op << ": undefined input";
  LOOM_CHECK(t.dim() >= 1) << op << ": input must have at least one dim, got " << shape_str(t.shape());
  return wrap_dim(dim, t.dim());
}

// What backward needs to make a zero gradient (without keeping the output alive).
struct Meta {
  Shape shape;
  DType dtype;
  Device device;
};
Meta meta_of(const Tensor& t) { return Meta{t.shape(), t.dtype(), t.device()}; }

// Gradient of an output that got none: zeros, so the adjoint collective still runs on this rank.
Tensor grad_or_zeros(const Tensor& grad, const Meta& m) {
  if (grad.defined()) return grad;
  return Tensor::zeros(m.shape, m.dtype, m.device);
}

// All-gather of `t` along `d` (a plain tensor op).
Tensor gather_along(const Tensor& t, Communicator& comm, int64_t d) {
  Tensor front = t.transpose(0, d).contiguous();  // (N, ...) with `d` first
  Shape shape = front.shape();
  shape[0] *= comm.size();
  Tensor out = Tensor::empty(shape, t.dtype(), t.device());  // (P*N, ...)
  comm.all_gather(out, front, stream_for(t));
  return out.transpose(0, d).contiguous();
}

// Reduce-scatter (sum) of `t` along `d` (a plain tensor op).
Tensor scatter_along(const Tensor& t, Communicator& comm, int64_t d) {
  const int p = comm.size();
  LOOM_CHECK(t.size(d) % p == 0) << "reduce_scatter: dim " << d << " of " << shape_str(t.shape())
                                 << " is not a multiple of the group size " << p << " (group " << comm.name() << ")";
  Tensor front = t.transpose(0, d).contiguous();  // (P*N, ...)
  Shape shape = front.shape();
  shape[0] /= p;
  Tensor out = Tensor::empty(shape, t.dtype(), t.device());  // (N, ...)
  comm.reduce_scatter(out, front, ReduceOp::sum, stream_for(t));
  return out.transpose(0, d).contiguous();
}

// All-to-all: blocks of `split` to ranks, received blocks concatenated along `cat`.
Tensor exchange(const Tensor& t, Communicator& comm, int64_t split, int64_t cat) {
  const int p = comm.size();
  LOOM_CHECK(t.size(split) % p == 0) << "all_to_all: dim " << split << " of " << shape_str(t.shape())
                                     << " is not a multiple of the group size " << p << " (group " << comm.name()
                                     << ")";
  const int64_t piece = t.size(split) / p;
  Shape block = t.shape();
  block[split] = piece;
  Shape stacked = block;
  stacked.insert(stacked.begin(), p);
  Tensor send = Tensor::empty(stacked, t.dtype(), t.device());  // (P, block...)
  for (int r = 0; r < p; ++r) send.select(0, r).copy_(t.narrow(split, r * piece, piece));
  Tensor recv = Tensor::empty(stacked, t.dtype(), t.device());  // (P, block...)
  comm.all_to_all(recv, send, stream_for(t));
  Shape out_shape = block;
  out_shape[cat] *= p;
  Tensor out = Tensor::empty(out_shape, t.dtype(), t.device());
  const int64_t width = block[cat];
  for (int r = 0; r < p; ++r) out.narrow(cat, r * width, width).copy_(recv.select(0, r));
  return out;
}

Tensor all_reduced(const Tensor& t, Communicator& comm) {
  Tensor out = t.contiguous().clone();
  comm.all_reduce(out, ReduceOp::sum, stream_for(t));
  return out;
}

void check_root(const char* op, const Communicator& comm, int root) {
  LOOM_CHECK(root >= 0 && root < comm.size()) << op << ": root " << root << " out of range for group " << comm.name()
                                             << " of " << comm.size() << " ranks";
}

}  // namespace

Variable all_gather(const Variable& x, Communicator& comm, int64_t dim) {
  const int64_t d = checked_dim("all_gather", x.data(), dim);
  Tensor out = gather_along(x.data(), comm, d);
  Communicator* c = &comm;
  // forward all-gather / backward reduce-scatter
  return make_output(out, {x}, "AllGather", [c, d, m = meta_of(out)](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{scatter_along(grad_or_zeros(g[0], m), *c, d)};
  });
}

Variable reduce_scatter(const Variable& x, Communicator& comm, int64_t dim) {
  const int64_t d = checked_dim("reduce_scatter", x.data(), dim);
  Tensor out = scatter_along(x.data(), comm, d);
  Communicator* c = &comm;
  // forward reduce-scatter / backward all-gather
  return make_output(out, {x}, "ReduceScatter", [c, d, m = meta_of(out)](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{gather_along(grad_or_zeros(g[0], m), *c, d)};
  });
}

Variable all_to_all(const Variable& x, Communicator& comm, int64_t split_dim, int64_t concat_dim) {
  const int64_t s = checked_dim("all_to_all", x.data(), split_dim);
  const int64_t c = wrap_dim(concat_dim, x.dim());
  Tensor out = exchange(x.data(), comm, s, c);
  Communicator* group = &comm;
  // forward all-to-all (split s, concat c) / backward all-to-all (split c, concat s)
  return make_output(out, {x}, "AllToAll", [group, s, c, m = meta_of(out)](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{exchange(grad_or_zeros(g[0], m), *group, c, s)};
  });
}

Variable broadcast(const Variable& x, Communicator& comm, int root) {
  check_root("broadcast", comm, root);
  LOOM_CHECK(x.defined()) << "broadcast: undefined input";
  Tensor out = x.data().contiguous().clone();
  comm.broadcast(out, root, stream_for(out));
  Communicator* c = &comm;
  // forward broadcast / backward reduce (sum) to root
  return make_output(out, {x}, "Broadcast", [c, root, m = meta_of(out)](const std::vector<Tensor>& g) {
    Tensor sum = all_reduced(grad_or_zeros(g[0], m), *c);
    if (c->rank() != root) sum.zero_();  // only the root's x reached the outputs
    return std::vector<Tensor>{sum};
  });
}

Variable reduce(const Variable& x, Communicator& comm, int root) {
  check_root("reduce", comm, root);
  LOOM_CHECK(x.defined()) << "reduce: undefined input";
  Tensor out = all_reduced(x.data(), comm);
  if (comm.rank() != root) out.zero_();
  Communicator* c = &comm;
  // forward reduce (sum) to root / backward broadcast from root
  return make_output(out, {x}, "Reduce", [c, root, m = meta_of(out)](const std::vector<Tensor>& g) {
    Tensor grad = grad_or_zeros(g[0], m).contiguous().clone();
    c->broadcast(grad, root, stream_for(grad));
    return std::vector<Tensor>{grad};
  });
}

Variable copy_to_group(const Variable& x, Communicator& comm) {
  LOOM_CHECK(x.defined()) << "copy_to_group: undefined input";
  Communicator* c = &comm;
  // forward identity / backward all-reduce (sum)
  return make_output(x.data(), {x}, "CopyToGroup", [c, m = meta_of(x.data())](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{all_reduced(grad_or_zeros(g[0], m), *c)};
  });
}

Variable reduce_from_group(const Variable& x, Communicator& comm) {
  LOOM_CHECK(x.defined()) << "reduce_from_group: undefined input";
  Tensor out = all_reduced(x.data(), comm);
  // forward all-reduce (sum) / backward identity
  return make_output(out, {x}, "ReduceFromGroup", [](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{g[0]};
  });
}

Variable all_reduce_sum(const Variable& x, Communicator& comm) {
  LOOM_CHECK(x.defined()) << "all_reduce_sum: undefined input";
  Tensor out = all_reduced(x.data(), comm);
  Communicator* c = &comm;
  // forward all-reduce (sum) / backward all-reduce (sum)
  return make_output(out, {x}, "AllReduceSum", [c, m = meta_of(out)](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{all_reduced(grad_or_zeros(g[0], m), *c)};
  });
}

}  // namespace loom::sp
