// LASP-2 as one autograd node over the lightning kernels of the data's device
// (kernels/dispatch.h; see lasp2.h). Everything runs on that device, in stream
// order, with no host wait: the unit's memory state M_u is the final state of
// a lightning pass from a zero state; the state gradient dP_u is the initial-
// state gradient of a lightning backward with no final-state gradient; the
// prefix/suffix scans are per-head decay multiplies and adds of (B, H, D, D)
// states in the state dtype (fp32 for 16-bit data, as the CUDA kernels keep
// their states). The decay factors of all units go to the device in one
// queued upload per call; the decays themselves stay a host tensor (the
// kernels form their powers on the host).
//
// Cost: two kernel passes per unit each way (one to make the state or state
// gradient that is gathered, one from the scanned state). The gather waits for
// the first pass, and the second needs the gathered states, so nothing
// overlaps the collective here (see lasp2.h for the split that would).
#include "parallel/lasp2.h"

#include <algorithm>
#include <cmath>

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
  // Local memory states M_u, one per unit: (U, B, H, D, D), the final state of
  // a pass from a zero state (its output is not needed).
  Tensor local = Tensor::empty({U, B, H, D, D}, state_dtype, device);
  for (int u = 0; u < U; ++u) {
    Tensor qu = unit_slice(qc, starts[u], chunks[u].length), ku = unit_slice(kc, starts[u], chunks[u].length),
           vu = unit_slice(vc, starts[u], chunks[u].length);
    Tensor scratch = Tensor::empty(qu.shape(), dtype, device);  // (B, L_u, H, D)
    Tensor m = local.select(0, u);
    dispatch::lightning_forward(scratch, m, qu, ku, vu, Tensor(), lambdas_f64, out_scale, block_size, stream);
  }
  Tensor gathered = Tensor::empty({int64_t{cp.size()} * U, B, H, D, D}, state_dtype, device);  // (P*U, B, H, D, D)
  cp.all_gather(gathered, local, stream);  // the one forward collective (NCCL for CUDA tensors)
  std::vector<Tensor> initial = scan_units(gathered, decays, units, U, rank, /*suffix=*/false, stream);  // P_u
  gathered = Tensor();
  local = Tensor();

  Tensor out = Tensor::empty(q.shape(), dtype, device);  // (B, T_local, H, D)
  for (int u = 0; u < U; ++u) {
    Tensor qu = unit_slice(qc, starts[u], chunks[u].length), ku = unit_slice(kc, starts[u], chunks[u].length),
           vu = unit_slice(vc, starts[u], chunks[u].length);
    Tensor ou = Tensor::empty(qu.shape(), dtype, device);              // (B, L_u, H, D)
    Tensor final_state = Tensor::empty(state_shape, state_dtype, device);  // (B, H, D, D), unused
    dispatch::lightning_forward(ou, final_state, qu, ku, vu, initial[u], lambdas_f64, out_scale, block_size, stream);
    out.narrow(1, starts[u], chunks[u].length).copy_(ou);
  }

  Communicator* group = &cp;
  auto backward = [qc, kc, vc, initial, lambdas_f64, decays, chunks, starts, units, rank, U, out_scale, block_size,
                   group, state_shape, state_dtype](const std::vector<Tensor>& grads) {
    const Device dev = qc.device();
    const DType dt = qc.dtype();
    Stream& s = Stream::default_for(dev);
    // A rank whose output got no gradient still joins the all-gather (with zeros).
    Tensor dout = grads[0].defined() ? grads[0].to(dt).contiguous() : Tensor::zeros(qc.shape(), dt, dev);
    Shape local_shape = state_shape;
    local_shape.insert(local_shape.begin(), U);
    // dP_u = s_o Σ_i γ^(i+1) q_iᵀ do_i: the initial-state gradient of a
    // backward pass with no final-state gradient (its dq, dk, dv are not needed).
    Tensor local_dp = Tensor::empty(local_shape, state_dtype, dev);  // (U, B, H, D, D)
    for (int u = 0; u < U; ++u) {
      const int64_t at = starts[u], len = chunks[u].length;
      Tensor qu = unit_slice(qc, at, len), ku = unit_slice(kc, at, len), vu = unit_slice(vc, at, len);
      Tensor du = unit_slice(dout, at, len);
      Tensor sq = Tensor::empty(qu.shape(), dt, dev), sk = Tensor::empty(qu.shape(), dt, dev),
             sv = Tensor::empty(qu.shape(), dt, dev);  // (B, L_u, H, D) scratch
      Tensor dp = local_dp.select(0, u);
      dispatch::lightning_backward(sq, sk, sv, dp, du, Tensor(), qu, ku, vu, initial[u], lambdas_f64, out_scale,
                                   block_size, s);
    }
    Shape all_shape = local_shape;
    all_shape[0] *= group->size();
    Tensor gathered_dp = Tensor::empty(all_shape, state_dtype, dev);  // (P*U, B, H, D, D)
    group->all_gather(gathered_dp, local_dp, s);  // the one backward collective
    std::vector<Tensor> dfinal = scan_units(gathered_dp, decays, units, U, rank, /*suffix=*/true, s);  // G_u
    gathered_dp = Tensor();
    local_dp = Tensor();

    Tensor dq = Tensor::empty(qc.shape(), dt, dev), dk = Tensor::empty(qc.shape(), dt, dev),
           dv = Tensor::empty(qc.shape(), dt, dev);  // (B, T_local, H, D)
    for (int u = 0; u < U; ++u) {
      const int64_t at = starts[u], len = chunks[u].length;
      Tensor qu = unit_slice(qc, at, len), ku = unit_slice(kc, at, len), vu = unit_slice(vc, at, len);
      Tensor du = unit_slice(dout, at, len);
      Tensor dqu = Tensor::empty(qu.shape(), dt, dev), dku = Tensor::empty(qu.shape(), dt, dev),
             dvu = Tensor::empty(qu.shape(), dt, dev);  // (B, L_u, H, D)
      Tensor no_ds0;
      dispatch::lightning_backward(dqu, dku, dvu, no_ds0, du, dfinal[u], qu, ku, vu, initial[u], lambdas_f64,
                                   out_scale, block_size, s);
      dq.narrow(1, at, len).copy_(dqu);
      dk.narrow(1, at, len).copy_(dku);
      dv.narrow(1, at, len).copy_(dvu);
    }
    return std::vector<Tensor>{dq, dk, dv};
  };
  return make_output(out, {q, k, v}, "Lasp2Attention", std::move(backward));
}

}  // namespace loom
