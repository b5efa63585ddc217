// LASP-2 as one autograd node over the CPU lightning kernels (see lasp2.h).
// The two decay-weighted outer-product sums (the unit's memory state M_u and
// the state gradient dP_u) are plain loops here: each is O(T·D²) per head,
// the same order as one state update of the blocked kernel.
#include "parallel/lasp2.h"

#include <algorithm>
#include <cmath>

#include "framework/error.h"
#include "framework/stream.h"
#include "kernels/cpu/lightning.h"

namespace loom {
namespace {

// out (B, H, D, D) = scale · Σ_t γ_h^e(t) a_tᵀ c_t over a (B, L, H, D), c (B, L, H, D);
// e(t) = L-1-t (memory state) or t+1 (state gradient). Sums in double.
template <typename T>
void weighted_outer_sum(Tensor& out, const Tensor& a, const Tensor& c, const std::vector<double>& lambdas,
                        double scale, bool from_end) {
  const int64_t B = a.size(0), L = a.size(1), H = a.size(2), D = a.size(3);
  const T* pa = a.data<T>();
  const T* pc = c.data<T>();
  T* po = out.data<T>();
  std::vector<double> acc(static_cast<size_t>(D * D));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < L; ++t) {
        const double e = from_end ? static_cast<double>(L - 1 - t) : static_cast<double>(t + 1);
        const double w = scale * std::exp(-lambdas[h] * e);
        const T* at = pa + ((b * L + t) * H + h) * D;
        const T* ct = pc + ((b * L + t) * H + h) * D;
        for (int64_t i = 0; i < D; ++i) {
          const double ai = w * static_cast<double>(at[i]);
          double* row = acc.data() + i * D;
          for (int64_t j = 0; j < D; ++j) row[j] += ai * static_cast<double>(ct[j]);
        }
      }
      T* o = po + (b * H + h) * D * D;
      for (int64_t i = 0; i < D * D; ++i) o[i] = static_cast<T>(acc[i]);
    }
  }
}

void outer_sum(Tensor& out, const Tensor& a, const Tensor& c, const std::vector<double>& lambdas, double scale,
               bool from_end) {
  if (a.dtype() == DType::f64) weighted_outer_sum<double>(out, a, c, lambdas, scale, from_end);
  else weighted_outer_sum<float>(out, a, c, lambdas, scale, from_end);
}

// state (B, H, D, D) <- γ_h^length · state + add (add may be undefined).
void decay_and_add(Tensor& state, const Tensor& add, const std::vector<double>& lambdas, int64_t length) {
  const int64_t B = state.size(0), H = state.size(1), DD = state.size(2) * state.size(3);
  auto run = [&](auto* s, const auto* x) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const double a = std::exp(-lambdas[h] * static_cast<double>(length));
        const int64_t base = (b * H + h) * DD;
        for (int64_t i = 0; i < DD; ++i) {
          double v = a * static_cast<double>(s[base + i]) + (x ? static_cast<double>(x[base + i]) : 0.0);
          s[base + i] = static_cast<std::remove_pointer_t<decltype(s)>>(v);
        }
      }
    }
  };
  if (state.dtype() == DType::f64) run(state.data<double>(), add.defined() ? add.data<double>() : nullptr);
  else run(state.data<float>(), add.defined() ? add.data<float>() : nullptr);
}

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

// Prefix (forward) or suffix (backward) scan over the gathered per-unit tensors
// (U_total, B, H, D, D), in sequence order; returns the scan value of each of
// `rank`'s units (local chunk order). Prefix: P_first = 0, P_{u+1} = a_u P_u + X_u.
// Suffix: G_last = 0, G_u = a_{u+1} G_{u+1} + X_{u+1}.
std::vector<Tensor> scan_units(const Tensor& gathered, const std::vector<LaspUnit>& units, int chunks_per_rank,
                               int rank, const std::vector<double>& lambdas, bool suffix) {
  Shape state_shape(gathered.shape().begin() + 1, gathered.shape().end());
  std::vector<Tensor> mine(static_cast<size_t>(chunks_per_rank));
  Tensor running = Tensor::zeros(state_shape, gathered.dtype());  // (B, H, D, D)
  const int64_t n = static_cast<int64_t>(units.size());
  for (int64_t step = 0; step < n; ++step) {
    const int64_t u = suffix ? n - 1 - step : step;
    const LaspUnit& unit = units[static_cast<size_t>(u)];
    if (unit.rank == rank) mine[static_cast<size_t>(unit.chunk)] = running.clone();
    if (step + 1 == n) break;
    // Fold this unit in: prefix P_{u+1} = a_u P_u + M_u; suffix G_{u-1} = a_u G_u + dP_u.
    Tensor contribution = gathered.select(0, int64_t{unit.rank} * chunks_per_rank + unit.chunk);
    decay_and_add(running, contribution.contiguous(), lambdas, unit.tokens.length);
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
  LOOM_CHECK((q.dtype() == DType::f32 || q.dtype() == DType::f64) && k.dtype() == q.dtype() && v.dtype() == q.dtype())
      << op << ": q, k, v must share dtype f32 or f64, got " << q.dtype() << ", " << k.dtype() << ", " << v.dtype();
  LOOM_CHECK(q.device().is_cpu()) << op << ": no CUDA path yet, q on " << q.device();
  LOOM_CHECK(cp.size() == layout.cp_size()) << op << ": layout for cp " << layout.cp_size() << " but group "
                                            << cp.name() << " has " << cp.size() << " ranks";
  LOOM_CHECK(q.size(1) == layout.local_len()) << op << ": q has " << q.size(1) << " tokens, the layout gives rank "
                                              << cp.rank() << " " << layout.local_len() << " (seq_len "
                                              << layout.seq_len() << ", cp " << layout.cp_size() << ")";
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  LOOM_CHECK(decay_lambdas.defined() && decay_lambdas.dim() == 1 && decay_lambdas.size(0) == H)
      << op << ": decay_lambdas must be (H) = (" << H << ")";
  const int rank = cp.rank();
  const std::vector<TokenChunk> chunks = layout.chunks(rank);
  const int U = static_cast<int>(chunks.size());
  const std::vector<int64_t> starts = local_starts(chunks);
  const std::vector<LaspUnit> units = lasp2_units(layout);
  const std::vector<double> lambdas = decay_lambdas.to_vector<double>();
  Tensor lambdas_f64 = decay_lambdas.to(DType::f64).clone();  // (H), owned
  Stream& stream = Stream::default_for(q.device());

  Tensor qc = q.data().contiguous(), kc = k.data().contiguous(), vc = v.data().contiguous();  // (B, T_local, H, D)
  const Shape state_shape{B, H, D, D};
  // Local memory states, one per unit: (U, B, H, D, D).
  Tensor local = Tensor::empty({U, B, H, D, D}, q.dtype());
  for (int u = 0; u < U; ++u) {
    Tensor ku = unit_slice(kc, starts[u], chunks[u].length), vu = unit_slice(vc, starts[u], chunks[u].length);
    Tensor m = local.select(0, u);
    outer_sum(m, ku, vu, lambdas, 1.0, /*from_end=*/true);
  }
  Tensor gathered = Tensor::empty({int64_t{cp.size()} * U, B, H, D, D}, q.dtype());  // (P*U, B, H, D, D)
  cp.all_gather(gathered, local, stream);
  std::vector<Tensor> initial = scan_units(gathered, units, U, rank, lambdas, /*suffix=*/false);  // P_u
  gathered = Tensor();

  Tensor out = Tensor::empty(q.shape(), q.dtype());  // (B, T_local, H, D)
  for (int u = 0; u < U; ++u) {
    Tensor qu = unit_slice(qc, starts[u], chunks[u].length), ku = unit_slice(kc, starts[u], chunks[u].length),
           vu = unit_slice(vc, starts[u], chunks[u].length);
    Tensor ou = Tensor::empty(qu.shape(), q.dtype());
    Tensor final_state = Tensor::empty(state_shape, q.dtype());
    cpu::lightning_forward(ou, final_state, qu, ku, vu, initial[u], lambdas_f64, out_scale, block_size, stream);
    out.narrow(1, starts[u], chunks[u].length).copy_(ou);
  }

  Communicator* group = &cp;
  auto backward = [qc, kc, vc, initial, lambdas, lambdas_f64, chunks, starts, units, rank, U, out_scale, block_size,
                   group, state_shape](const std::vector<Tensor>& grads) {
    Stream& s = Stream::default_for(qc.device());
    // A rank whose output got no gradient still joins the all-gather (with zeros).
    Tensor dout = grads[0].defined() ? grads[0].contiguous() : Tensor::zeros(qc.shape(), qc.dtype());
    Shape local_shape = state_shape;
    local_shape.insert(local_shape.begin(), U);
    Tensor local_dp = Tensor::empty(local_shape, qc.dtype());  // (U, B, H, D, D)
    for (int u = 0; u < U; ++u) {
      Tensor qu = unit_slice(qc, starts[u], chunks[u].length), du = unit_slice(dout, starts[u], chunks[u].length);
      Tensor dp = local_dp.select(0, u);
      outer_sum(dp, qu, du, lambdas, out_scale, /*from_end=*/false);
    }
    Shape all_shape = local_shape;
    all_shape[0] *= group->size();
    Tensor gathered_dp = Tensor::empty(all_shape, qc.dtype());  // (P*U, B, H, D, D)
    group->all_gather(gathered_dp, local_dp, s);
    std::vector<Tensor> dfinal = scan_units(gathered_dp, units, U, rank, lambdas, /*suffix=*/true);  // G_u
    gathered_dp = Tensor();

    Tensor dq = Tensor::empty(qc.shape(), qc.dtype()), dk = Tensor::empty(qc.shape(), qc.dtype()),
           dv = Tensor::empty(qc.shape(), qc.dtype());  // (B, T_local, H, D)
    for (int u = 0; u < U; ++u) {
      const int64_t at = starts[u], len = chunks[u].length;
      Tensor qu = unit_slice(qc, at, len), ku = unit_slice(kc, at, len), vu = unit_slice(vc, at, len);
      Tensor du = unit_slice(dout, at, len);
      Tensor dqu = Tensor::empty(qu.shape(), qc.dtype()), dku = Tensor::empty(qu.shape(), qc.dtype()),
             dvu = Tensor::empty(qu.shape(), qc.dtype());
      Tensor no_ds0;
      cpu::lightning_backward(dqu, dku, dvu, no_ds0, du, dfinal[u], qu, ku, vu, initial[u], lambdas_f64, out_scale,
                              block_size, s);
      dq.narrow(1, at, len).copy_(dqu);
      dk.narrow(1, at, len).copy_(dku);
      dv.narrow(1, at, len).copy_(dvu);
    }
    return std::vector<Tensor>{dq, dk, dv};
  };
  return make_output(out, {q, k, v}, "Lasp2Attention", std::move(backward));
}

}  // namespace loom
