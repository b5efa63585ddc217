// LASP-2 as one autograd node over the kernels of the data's device
// (kernels/dispatch.h; see lasp2.h). Everything runs on that device, in stream
// order, with no host wait. The gathered states come from small batched GEMMs
// (M_u = Σ_j γ^(L-1-j) k_jᵀ v_j, dP_u = s_o Σ_i γ^(i+1) q_iᵀ do_i, in the
// state dtype: fp32 for 16-bit data); the all-gather is then posted on a side
// stream (CUDA) while the lightning kernel runs each local unit from a zero
// state, and the inter-unit terms are added after the scan:
//   forward   o_i  += s_o γ^(i+1) q_i P_u
//   backward  dk_j += γ^(L-1-j) v_j G_uᵀ,  dv_j += γ^(L-1-j) k_j G_u
// (dq does not depend on G_u; the kernel's backward from P_u gives the rest).
// The prefix/suffix scans are per-head decay multiplies and adds of
// (B, H, D, D) states. Decay factors go to the device as queued uploads; the
// decays themselves stay a host tensor (the kernels form their powers there).
#include "parallel/lasp2.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "framework/error.h"
#include "framework/op_checks.h"
#include "framework/stream.h"
#include "kernels/dispatch.h"

namespace loom {
namespace {

// The unit's tokens of a (B, T_local, H, D) tensor, contiguous.
Tensor unit_slice(const Tensor& t, int64_t local_start, int64_t length) {
  return t.narrow(1, local_start, length).contiguous();
}

// Local start of each of this rank's chunks within its T_local tokens.
std::vector<int64_t> local_starts(const std::vector<TokenChunk>& chunks) {
  std::vector<int64_t> starts;
  int64_t at = 0;
  for (const TokenChunk& c : chunks) {
    starts.push_back(at);
    at += c.length;
  }
  return starts;
}

// Per-unit, per-head state decay a_u,h = γ_h^(L_u) (units in sequence order):
// (n_units, 1, H, 1, 1) in `dtype` on `device`, formed in double on the host
// and uploaded once (a queued upload, no host wait; see framework/storage.cpp).
Tensor unit_decays(const std::vector<LaspUnit>& units, const std::vector<double>& lambdas, DType dtype,
                   Device device) {
  const int64_t n = static_cast<int64_t>(units.size()), H = static_cast<int64_t>(lambdas.size());
  std::vector<double> values(static_cast<size_t>(n * H));
  for (int64_t u = 0; u < n; ++u)
    for (int64_t h = 0; h < H; ++h)
      values[static_cast<size_t>(u * H + h)] =
          std::exp(-lambdas[static_cast<size_t>(h)] * static_cast<double>(units[static_cast<size_t>(u)].tokens.length));
  return Tensor::from_vector(values, {n, 1, H, 1, 1}).to(dtype).to(device);
}

// Per-token, per-head weights scale·γ_h^e(t) over a unit of L tokens, e(t) =
// L-1-t (from_end: the state a token leaves at the unit's end) or t+1 (the
// decay from the unit's initial state to token t): (1, L, H, 1) in `dtype` on
// `device`, formed in double on the host, one queued upload.
Tensor token_weights(int64_t L, const std::vector<double>& lambdas, double scale, bool from_end, DType dtype,
                     Device device) {
  const int64_t H = static_cast<int64_t>(lambdas.size());
  std::vector<double> values(static_cast<size_t>(L * H));
  for (int64_t t = 0; t < L; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const double e = from_end ? static_cast<double>(L - 1 - t) : static_cast<double>(t + 1);
      values[static_cast<size_t>(t * H + h)] = scale * std::exp(-lambdas[static_cast<size_t>(h)] * e);
    }
  return Tensor::from_vector(values, {1, L, H, 1}).to(dtype).to(device);
}

// x (B, L, H, D) in `dtype`, times w (1, L, H, 1): a new contiguous tensor.
Tensor weighted(const Tensor& x, const Tensor& w, DType dtype, Stream& s) {
  Tensor out = Tensor::empty(x.shape(), dtype, x.device());  // (B, L, H, D)
  dispatch::binary(out, x.to(dtype), w, dispatch::BinaryOp::mul, s);
  return out;
}

// out (B, H, D, D) = Σ_t w_t a_tᵀ c_t per head, for a, c (B, L, H, D) (any
// floating dtype, contiguous) and w (1, L, H, 1) in out's dtype: one batched
// GEMM over the heads per batch entry, in out's dtype.
void weighted_outer(Tensor& out, const Tensor& a, const Tensor& c, const Tensor& w, Stream& s) {
  const DType dt = out.dtype();
  if (a.size(1) == 0) {
    out.copy_(Tensor::zeros(out.shape(), dt, out.device()));
    return;
  }
  Tensor aw = weighted(a, w, dt, s);  // (B, L, H, D)
  Tensor cc = c.to(dt);               // (B, L, H, D)
  for (int64_t b = 0; b < out.size(0); ++b) {
    Tensor ob = out.select(0, b);  // (H, D, D)
    dispatch::gemm(ob, aw.select(0, b).permute({1, 0, 2}), cc.select(0, b).permute({1, 0, 2}), /*trans_a=*/true,
                   /*trans_b=*/false, 1.0, 0.0, s);  // (H, L, D)ᵀ @ (H, L, D)
  }
}

// y (B, L, H, D) contiguous += (w_t x_t) S per head (S transposed if
// trans_s), for x (B, L, H, D), w (1, L, H, 1) and S (B, H, D, D) in y's dtype.
void add_weighted_state_product(Tensor& y, const Tensor& x, const Tensor& w, const Tensor& state, bool trans_s,
                                Stream& s) {
  const int64_t B = y.size(0), L = y.size(1), H = y.size(2), D = y.size(3);
  if (L == 0) return;
  Tensor xw = weighted(x, w, y.dtype(), s);                     // (B, L, H, D)
  Tensor term = Tensor::empty({H, L, D}, y.dtype(), y.device());  // (H, L, D), per batch entry
  for (int64_t b = 0; b < B; ++b) {
    dispatch::gemm(term, xw.select(0, b).permute({1, 0, 2}), state.select(0, b), /*trans_a=*/false, trans_s, 1.0,
                   0.0, s);
    Tensor yb = y.select(0, b);  // (L, H, D)
    dispatch::axpy(yb, term.permute({1, 0, 2}), 1.0, s);
  }
}

// An all-gather that overlaps the work queued on `compute` after it: on CUDA
// it runs on its own stream, after everything queued on `compute` so far (the
// states were written there), and finish() makes `compute` wait for it
// (stream order, no host sync). On the CPU the collective completes at once.
// Keeps both buffers alive until finish().
class PostedGather {
 public:
  PostedGather(Communicator& cp, Tensor& out, const Tensor& in, Stream& compute)
      : compute_(compute), out_(out), in_(in) {
    if (compute.device().is_cpu()) {
      cp.all_gather(out, in, compute);
      return;
    }
    side_ = std::make_unique<Stream>(compute.device());
    ready_ = std::make_unique<Event>(compute.device());
    done_ = std::make_unique<Event>(compute.device());
    ready_->record(compute);
    ready_->wait(*side_);
    cp.all_gather(out, in, *side_);  // the communicator orders its own stream after `side_` and back
    done_->record(*side_);
  }
  void finish() {
    if (done_) done_->wait(compute_);
    in_ = Tensor();
  }

 private:
  Stream& compute_;
  Tensor out_, in_;
  std::unique_ptr<Stream> side_;
  std::unique_ptr<Event> ready_, done_;
};

// Prefix (forward) or suffix (backward) scan over the gathered per-unit states
// (P*U, B, H, D, D; entry rank*U + chunk) in sequence order; returns the scan
// value of each of `rank`'s units (local chunk order). Prefix: P_first = 0,
// P_{u+1} = a_u P_u + X_u. Suffix: G_last = 0, G_{u-1} = a_u G_u + X_u.
// `decays` (n_units, 1, H, 1, 1) from unit_decays. Runs on the gathered
// tensor's device; every step writes a new state, so the returned ones are
// never overwritten.
std::vector<Tensor> scan_units(const Tensor& gathered, const Tensor& decays, const std::vector<LaspUnit>& units,
                               int chunks_per_rank, int rank, bool suffix, Stream& s) {
  Shape state_shape(gathered.shape().begin() + 1, gathered.shape().end());  // (B, H, D, D)
  std::vector<Tensor> mine(static_cast<size_t>(chunks_per_rank));
  Tensor running = Tensor::zeros(state_shape, gathered.dtype(), gathered.device());
  const int64_t n = static_cast<int64_t>(units.size());
  for (int64_t step = 0; step < n; ++step) {
    const int64_t u = suffix ? n - 1 - step : step;
    const LaspUnit& unit = units[static_cast<size_t>(u)];
    if (unit.rank == rank) mine[static_cast<size_t>(unit.chunk)] = running;
    if (step + 1 == n) break;
    Tensor next = Tensor::empty(state_shape, gathered.dtype(), gathered.device());  // (B, H, D, D)
    dispatch::binary(next, running, decays.select(0, u), dispatch::BinaryOp::mul, s);
    dispatch::axpy(next, gathered.select(0, int64_t{unit.rank} * chunks_per_rank + unit.chunk), 1.0, s);
    running = next;
  }
  return mine;
}

}  // namespace

std::vector<LaspUnit> lasp2_units(const TokenLayout& layout) {
  std::vector<LaspUnit> units;
  for (int r = 0; r < layout.cp_size(); ++r) {
    const auto& chunks = layout.chunks(r);
    for (int c = 0; c < static_cast<int>(chunks.size()); ++c) units.push_back(LaspUnit{r, c, chunks[c]});
  }
  std::sort(units.begin(), units.end(),
            [](const LaspUnit& a, const LaspUnit& b) { return a.tokens.start < b.tokens.start; });
  return units;
}

Variable lasp2_attention(const Variable& q, const Variable& k, const Variable& v, const Tensor& decay_lambdas,
                         double out_scale, int64_t block_size, const TokenLayout& layout, Communicator& cp) {
  const char* op = "lasp2_attention";
  LOOM_CHECK(q.defined() && k.defined() && v.defined()) << op << ": undefined input";
  LOOM_CHECK(q.dim() == 4 && k.shape() == q.shape() && v.shape() == q.shape())
      << op << ": q " << shape_str(q.shape()) << ", k " << shape_str(k.shape()) << ", v " << shape_str(v.shape())
      << " must all be (B, T_local, H, D)";
  LOOM_CHECK(k.device() == q.device() && v.device() == q.device())
      << op << ": q, k, v must share a device, got " << q.device() << ", " << k.device() << ", " << v.device();
  const bool on_cuda = q.device().is_cuda();
  const DType dtype = q.dtype();
  const bool dtype_ok = on_cuda ? (dtype == DType::f32 || dtype == DType::bf16)
                                : (dtype == DType::f32 || dtype == DType::f64);
  LOOM_CHECK(dtype_ok && k.dtype() == dtype && v.dtype() == dtype)
      << op << ": q, k, v must share dtype " << (on_cuda ? "f32 or bf16 (on CUDA)" : "f32 or f64 (on the CPU)")
      << ", got " << q.dtype() << ", " << k.dtype() << ", " << v.dtype() << " on " << q.device();
  LOOM_CHECK(cp.size() == layout.cp_size()) << op << ": layout for cp " << layout.cp_size() << " but group "
                                            << cp.name() << " has " << cp.size() << " ranks";
  LOOM_CHECK(q.size(1) == layout.local_len()) << op << ": q has " << q.size(1) << " tokens, the layout gives rank "
                                              << cp.rank() << " " << layout.local_len() << " (seq_len "
                                              << layout.seq_len() << ", cp " << layout.cp_size() << ")";
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  LOOM_CHECK(decay_lambdas.defined() && decay_lambdas.dim() == 1 && decay_lambdas.size(0) == H)
      << op << ": decay_lambdas must be (H) = (" << H << ")";
  LOOM_CHECK(is_floating(decay_lambdas.dtype())) << op << ": decay_lambdas must be floating, got "
                                                 << decay_lambdas.dtype();
  const int rank = cp.rank();
  const Device device = q.device();
  const DType state_dtype = stats_dtype(dtype);  // fp32 states for 16-bit data
  const std::vector<TokenChunk> chunks = layout.chunks(rank);
  const int U = static_cast<int>(chunks.size());
  const std::vector<int64_t> starts = local_starts(chunks);
  const std::vector<LaspUnit> units = lasp2_units(layout);
  // (H) f64 on the host, owned: the kernels of every device read the decays there.
  Tensor lambdas_f64 = decay_lambdas.to(Device::cpu()).to(DType::f64).clone();
  const std::vector<double> lambdas = lambdas_f64.to_vector<double>();
  Tensor decays = unit_decays(units, lambdas, state_dtype, device);  // (n_units, 1, H, 1, 1)
  Stream& stream = Stream::default_for(device);

  Tensor qc = q.data().contiguous(), kc = k.data().contiguous(), vc = v.data().contiguous();  // (B, T_local, H, D)
  const Shape state_shape{B, H, D, D};
  const int64_t seq_len = layout.seq_len();
  // Local memory states M_u, one per unit: (U, B, H, D, D) in the state dtype.
  Tensor local = Tensor::empty({U, B, H, D, D}, state_dtype, device);
  for (int u = 0; u < U; ++u) {
    const int64_t at = starts[u], len = chunks[u].length;
    Tensor m = local.select(0, u);
    weighted_outer(m, unit_slice(kc, at, len), unit_slice(vc, at, len),
                   token_weights(len, lambdas, 1.0, /*from_end=*/true, state_dtype, device), stream);
  }
  Tensor gathered = Tensor::empty({int64_t{cp.size()} * U, B, H, D, D}, state_dtype, device);  // (P*U, B, H, D, D)
  // The one forward collective (NCCL for CUDA tensors), beside the zero-state passes.
  PostedGather gather(cp, gathered, local, stream);
  std::vector<Tensor> partial(static_cast<size_t>(U));  // (B, L_u, H, D): each unit from a zero state
  for (int u = 0; u < U; ++u) {
    const int64_t at = starts[u], len = chunks[u].length;
    Tensor qu = unit_slice(qc, at, len), ku = unit_slice(kc, at, len), vu = unit_slice(vc, at, len);
    partial[u] = Tensor::empty(qu.shape(), dtype, device);
    Tensor final_state = Tensor::empty(state_shape, state_dtype, device);  // (B, H, D, D), = M_u, unused
    dispatch::lightning_forward(partial[u], final_state, qu, ku, vu, Tensor(), lambdas_f64, out_scale, block_size,
                                stream);
  }
  gather.finish();
  std::vector<Tensor> initial = scan_units(gathered, decays, units, U, rank, /*suffix=*/false, stream);  // P_u
  gathered = Tensor();
  local = Tensor();

  Tensor out = Tensor::empty(q.shape(), dtype, device);  // (B, T_local, H, D)
  for (int u = 0; u < U; ++u) {
    const int64_t at = starts[u], len = chunks[u].length;
    Tensor acc = partial[u].to(state_dtype);  // (B, L_u, H, D); the kernel's own tensor when dtypes agree
    if (chunks[u].start > 0)                  // the first unit of the sequence starts from zero
      add_weighted_state_product(acc, unit_slice(qc, at, len),
                                 token_weights(len, lambdas, out_scale, /*from_end=*/false, state_dtype, device),
                                 initial[u], /*trans_s=*/false, stream);
    out.narrow(1, at, len).copy_(acc);
  }
  partial.clear();

  Communicator* group = &cp;
  auto backward = [qc, kc, vc, initial, lambdas, lambdas_f64, decays, chunks, starts, units, rank, U, out_scale,
                   block_size, group, state_shape, state_dtype, seq_len](const std::vector<Tensor>& grads) {
    const Device dev = qc.device();
    const DType dt = qc.dtype();
    Stream& s = Stream::default_for(dev);
    // A rank whose output got no gradient still joins the all-gather (with zeros).
    Tensor dout = grads[0].defined() ? grads[0].to(dt).contiguous() : Tensor::zeros(qc.shape(), dt, dev);
    Shape local_shape = state_shape;
    local_shape.insert(local_shape.begin(), U);
    Tensor local_dp = Tensor::empty(local_shape, state_dtype, dev);  // (U, B, H, D, D)
    for (int u = 0; u < U; ++u) {
      const int64_t at = starts[u], len = chunks[u].length;
      Tensor dp = local_dp.select(0, u);
      weighted_outer(dp, unit_slice(qc, at, len), unit_slice(dout, at, len),
                     token_weights(len, lambdas, out_scale, /*from_end=*/false, state_dtype, dev), s);
    }
    Shape all_shape = local_shape;
    all_shape[0] *= group->size();
    Tensor gathered_dp = Tensor::empty(all_shape, state_dtype, dev);  // (P*U, B, H, D, D)
    // The one backward collective, beside the local backward from P_u with no
    // final-state gradient (its dq is final; dk, dv get the G_u terms below).
    PostedGather gather(*group, gathered_dp, local_dp, s);
    std::vector<Tensor> dqs(static_cast<size_t>(U)), dks(static_cast<size_t>(U)), dvs(static_cast<size_t>(U));
    for (int u = 0; u < U; ++u) {
      const int64_t at = starts[u], len = chunks[u].length;
      Tensor qu = unit_slice(qc, at, len), ku = unit_slice(kc, at, len), vu = unit_slice(vc, at, len);
      dqs[u] = Tensor::empty(qu.shape(), dt, dev);  // (B, L_u, H, D)
      dks[u] = Tensor::empty(qu.shape(), dt, dev);
      dvs[u] = Tensor::empty(qu.shape(), dt, dev);
      Tensor no_ds0;
      dispatch::lightning_backward(dqs[u], dks[u], dvs[u], no_ds0, unit_slice(dout, at, len), Tensor(), qu, ku, vu,
                                   initial[u], lambdas_f64, out_scale, block_size, s);
    }
    gather.finish();
    std::vector<Tensor> dfinal = scan_units(gathered_dp, decays, units, U, rank, /*suffix=*/true, s);  // G_u
    gathered_dp = Tensor();
    local_dp = Tensor();

    Tensor dq = Tensor::empty(qc.shape(), dt, dev), dk = Tensor::empty(qc.shape(), dt, dev),
           dv = Tensor::empty(qc.shape(), dt, dev);  // (B, T_local, H, D)
    for (int u = 0; u < U; ++u) {
      const int64_t at = starts[u], len = chunks[u].length;
      Tensor dk_acc = dks[u].to(state_dtype), dv_acc = dvs[u].to(state_dtype);  // (B, L_u, H, D)
      if (chunks[u].start + len < seq_len) {  // the last unit of the sequence has G_u = 0
        Tensor w = token_weights(len, lambdas, 1.0, /*from_end=*/true, state_dtype, dev);  // (1, L_u, H, 1)
        add_weighted_state_product(dk_acc, unit_slice(vc, at, len), w, dfinal[u], /*trans_s=*/true, s);
        add_weighted_state_product(dv_acc, unit_slice(kc, at, len), w, dfinal[u], /*trans_s=*/false, s);
      }
      dq.narrow(1, at, len).copy_(dqs[u]);
      dk.narrow(1, at, len).copy_(dk_acc);
      dv.narrow(1, at, len).copy_(dv_acc);
    }
    return std::vector<Tensor>{dq, dk, dv};
  };
  return make_output(out, {q, k, v}, "Lasp2Attention", std::move(backward));
}

}  // namespace loom
