// Reference attention CPU kernels. Forward: one query row (b, h, i) per
// iteration, scores for its visible keys kept in a per-thread buffer, exact
// (not online) softmax, and lse written beside the output so partial results
// can be merged. Backward follows ALGORITHMS.md §1 plus the lse gradient
// (d lse / d score = p). It runs in two race-free passes instead of one with
// atomics: pass 1 is row-parallel and writes dq; pass 2 is parallel over
// (b, kv head, key) and writes dk, dv, recomputing p. That doubles the exp
// work but keeps every output written by one thread, in a fixed order, so
// results are deterministic. The S2 block mask (ALGORITHMS.md §7) is tested
// per element here; the CUDA kernel will iterate over active blocks only. Sums run in float for f32 (fp32 statistics, as on
// the GPU) and in double for f64.
#include "kernels/cpu/attention.h"
#include "kernels/cpu/checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace loom::cpu {

namespace {

struct AttentionDims {
  int64_t B, T, S, H, Hkv, D;
  int64_t group() const { return H / Hkv; }
  int64_t q_index(int64_t b, int64_t i, int64_t h) const { return ((b * T + i) * H + h) * D; }   // q, out, dout
  int64_t kv_index(int64_t b, int64_t j, int64_t hk) const { return ((b * S + j) * Hkv + hk) * D; }
  int64_t row_index(int64_t b, int64_t h, int64_t i) const { return (b * H + h) * T + i; }         // lse
  int64_t work() const { return B * H * T * S * D; }
};

// Key j is visible to query i of kv head hk (causal: by global position; S2:
// the block pair must be active in pattern hk of Hkv, ALGORITHMS.md §7).
struct Mask {
  const int64_t* q_pos = nullptr;
  const int64_t* k_pos = nullptr;
  bool causal = false;
  S2Pattern s2;
  int64_t num_patterns = 1;
  bool visible(int64_t i, int64_t j, int64_t hk) const {
    if (causal && k_pos[j] > q_pos[i]) return false;
    return !s2.enabled() || s2_block_active(q_pos[i] / s2.block, k_pos[j] / s2.block, hk, num_patterns, s2);
  }
};

constexpr int64_t kParallelWork = 1 << 16;  // multiply-adds below which threads are not worth starting

template <typename Acc, typename T>
inline Acc dot(const T* a, const T* b, int64_t n) {
  Acc total = 0;
  for (int64_t d = 0; d < n; ++d) total += static_cast<Acc>(a[d]) * static_cast<Acc>(b[d]);
  return total;
}

template <typename T>
void attention_forward_kernel(T* out, T* lse, const T* q, const T* k, const T* v, const Mask& mask,
                              const AttentionDims& n, double scale) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Acc sc = static_cast<Acc>(scale);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
#pragma omp parallel if (n.work() > kParallelWork)
  {
    std::vector<Acc> scores(n.S), acc(n.D);
#pragma omp for schedule(static) collapse(3)
    for (int64_t b = 0; b < n.B; ++b)
      for (int64_t h = 0; h < n.H; ++h)
        for (int64_t i = 0; i < n.T; ++i) {
          int64_t hk = h / n.group();
          const T* qi = q + n.q_index(b, i, h);
          T* oi = out + n.q_index(b, i, h);
          Acc row_max = neg_inf;
          bool any = false;
          for (int64_t j = 0; j < n.S; ++j) {
            if (!mask.visible(i, j, hk)) {
              scores[j] = neg_inf;
              continue;
            }
            any = true;
            scores[j] = sc * dot<Acc>(qi, k + n.kv_index(b, j, hk), n.D);
            row_max = scores[j] > row_max ? scores[j] : row_max;
          }
          if (!any) {  // empty row: nothing to attend to
            for (int64_t d = 0; d < n.D; ++d) oi[d] = T(0);
            lse[n.row_index(b, h, i)] = static_cast<T>(neg_inf);
            continue;
          }
          Acc total = 0;
          for (int64_t d = 0; d < n.D; ++d) acc[d] = 0;
          for (int64_t j = 0; j < n.S; ++j) {
            if (scores[j] == neg_inf) continue;
            Acc p = std::exp(scores[j] - row_max);
            total += p;
            const T* vj = v + n.kv_index(b, j, hk);
            for (int64_t d = 0; d < n.D; ++d) acc[d] += p * static_cast<Acc>(vj[d]);
          }
          for (int64_t d = 0; d < n.D; ++d) oi[d] = static_cast<T>(acc[d] / total);
          lse[n.row_index(b, h, i)] = static_cast<T>(row_max + std::log(total));
        }
  }
}

template <typename T>
void attention_backward_kernel(T* dq, T* dk, T* dv, const T* dout, const T* dlse, const T* q, const T* k, const T* v,
                               const T* out, const T* lse, const T* delta_given, const Mask& mask,
                               const AttentionDims& n, double scale) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Acc sc = static_cast<Acc>(scale);
  const bool parallel = n.work() > kParallelWork;
  const int64_t rows = n.B * n.H * n.T;

  // delta (B, H, T) = rowsum(dout * out); the softmax-backward term of each row (given: dlse in it).
  std::vector<Acc> delta(rows, Acc(0));
  if (delta_given != nullptr) {
    for (int64_t r = 0; r < rows; ++r) delta[r] = static_cast<Acc>(delta_given[r]);
  } else if (dout != nullptr) {
#pragma omp parallel for schedule(static) collapse(3) if (parallel)
    for (int64_t b = 0; b < n.B; ++b)
      for (int64_t h = 0; h < n.H; ++h)
        for (int64_t i = 0; i < n.T; ++i)
          delta[n.row_index(b, h, i)] = dot<Acc>(dout + n.q_index(b, i, h), out + n.q_index(b, i, h), n.D);
  }
  // ds for query row (b, h, i) and key j, given p; dp = dout_i . v_j.
  auto grad_score = [&](int64_t b, int64_t h, int64_t i, int64_t j, Acc p) {
    int64_t row = n.row_index(b, h, i);
    Acc dp = dout != nullptr ? dot<Acc>(dout + n.q_index(b, i, h), v + n.kv_index(b, j, h / n.group()), n.D) : Acc(0);
    Acc g_lse = dlse != nullptr ? static_cast<Acc>(dlse[row]) : Acc(0);
    return p * (dp - delta[row] + g_lse);
  };

  // Pass 1: dq, one query row per iteration.
#pragma omp parallel if (parallel)
  {
    std::vector<Acc> acc(n.D);
#pragma omp for schedule(static) collapse(3)
    for (int64_t b = 0; b < n.B; ++b)
      for (int64_t h = 0; h < n.H; ++h)
        for (int64_t i = 0; i < n.T; ++i) {
          int64_t hk = h / n.group();
          const T* qi = q + n.q_index(b, i, h);
          Acc row_lse = static_cast<Acc>(lse[n.row_index(b, h, i)]);
          for (int64_t d = 0; d < n.D; ++d) acc[d] = 0;
          if (std::isfinite(row_lse)) {
            for (int64_t j = 0; j < n.S; ++j) {
              if (!mask.visible(i, j, hk)) continue;
              const T* kj = k + n.kv_index(b, j, hk);
              Acc p = std::exp(sc * dot<Acc>(qi, kj, n.D) - row_lse);
              Acc ds = grad_score(b, h, i, j, p);
              for (int64_t d = 0; d < n.D; ++d) acc[d] += ds * static_cast<Acc>(kj[d]);
            }
          }
          T* dqi = dq + n.q_index(b, i, h);
          for (int64_t d = 0; d < n.D; ++d) dqi[d] = static_cast<T>(sc * acc[d]);
        }
  }

  // Pass 2: dk and dv, one key row of one kv head per iteration, summed over
  // the query heads of its group and all query rows that see it.
#pragma omp parallel if (parallel)
  {
    std::vector<Acc> acc_k(n.D), acc_v(n.D);
#pragma omp for schedule(static) collapse(3)
    for (int64_t b = 0; b < n.B; ++b)
      for (int64_t hk = 0; hk < n.Hkv; ++hk)
        for (int64_t j = 0; j < n.S; ++j) {
          const T* kj = k + n.kv_index(b, j, hk);
          for (int64_t d = 0; d < n.D; ++d) acc_k[d] = acc_v[d] = 0;
          for (int64_t h = hk * n.group(); h < (hk + 1) * n.group(); ++h)
            for (int64_t i = 0; i < n.T; ++i) {
              if (!mask.visible(i, j, hk)) continue;
              Acc row_lse = static_cast<Acc>(lse[n.row_index(b, h, i)]);
              if (!std::isfinite(row_lse)) continue;
              const T* qi = q + n.q_index(b, i, h);
              Acc p = std::exp(sc * dot<Acc>(qi, kj, n.D) - row_lse);
              Acc ds = grad_score(b, h, i, j, p);
              for (int64_t d = 0; d < n.D; ++d) acc_k[d] += ds * static_cast<Acc>(qi[d]);
              if (dout != nullptr) {
                const T* doi = dout + n.q_index(b, i, h);
                for (int64_t d = 0; d < n.D; ++d) acc_v[d] += p * static_cast<Acc>(doi[d]);
              }
            }
          T* dkj = dk + n.kv_index(b, j, hk);
          T* dvj = dv + n.kv_index(b, j, hk);
          for (int64_t d = 0; d < n.D; ++d) {
            dkj[d] = static_cast<T>(sc * acc_k[d]);
            dvj[d] = static_cast<T>(acc_v[d]);
          }
        }
  }
}

// Validates q, k, v and the positions; returns the dims and the mask.
AttentionDims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_positions,
                           const Tensor& k_positions, bool causal, const S2Pattern& s2, const char* op, Mask& mask) {
  check_operand(q, op, "q");
  check_operand(k, op, "k");
  check_operand(v, op, "v");
  LOOM_CHECK(q.dim() == 4 && k.dim() == 4) << op << ": q " << shape_str(q.shape()) << " must be (B, T, H, D) and k "
                                           << shape_str(k.shape()) << " (B, S, Hkv, D)";
  AttentionDims n{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  LOOM_CHECK(k.size(0) == n.B && k.size(3) == n.D)
      << op << ": k shape " << shape_str(k.shape()) << " does not match q " << shape_str(q.shape())
      << " in batch or head dim";
  LOOM_CHECK(n.Hkv > 0 && n.H % n.Hkv == 0) << op << ": H = " << n.H << " query heads is not a multiple of Hkv = "
                                            << n.Hkv << " kv heads";
  check_shape(k, k.shape(), q.dtype(), op, "k");
  check_shape(v, k.shape(), q.dtype(), op, "v");
  mask.causal = causal;
  mask.s2 = s2;
  mask.num_patterns = n.Hkv;
  if (s2.enabled()) {
    LOOM_CHECK(s2.local_blocks >= 1 && s2.vert_stride >= 1)
        << op << ": S2 local_blocks = " << s2.local_blocks << " and vert_stride = " << s2.vert_stride
        << " must be >= 1";
  }
  if (causal || s2.enabled()) {
    check_operand(q_positions, op, "q_positions");
    check_operand(k_positions, op, "k_positions");
    check_shape(q_positions, {n.T}, DType::i64, op, "q_positions");
    check_shape(k_positions, {n.S}, DType::i64, op, "k_positions");
    mask.q_pos = q_positions.data<int64_t>();
    mask.k_pos = k_positions.data<int64_t>();
  }
  return n;
}

}  // namespace

MaskForm mask_form(const int64_t* q_pos, int64_t T, const int64_t* k_pos, int64_t S, bool causal) {
  if (!causal || T == 0 || S == 0) return MaskForm::diagonal(S);
  const int64_t q_min = *std::min_element(q_pos, q_pos + T), k_max = *std::max_element(k_pos, k_pos + S);
  if (k_max <= q_min) return MaskForm::diagonal(S);
  for (int64_t i = 1; i < T; ++i)
    if (q_pos[i] != q_pos[0] + i) return MaskForm::positions();
  for (int64_t j = 1; j < S; ++j)
    if (k_pos[j] <= k_pos[j - 1]) return MaskForm::positions();
  // visible(i): keys at positions <= q_pos[i], a prefix of the ascending keys.
  int64_t visible = 0, offset = 0;
  for (int64_t i = 0; i < T; ++i) {
    while (visible < S && k_pos[visible] <= q_pos[i]) ++visible;
    if (i == 0) {
      if (visible == 0) return MaskForm::positions();  // a row that sees nothing
      offset = visible - 1;
    }
    if (visible != std::min(S, i + offset + 1)) return MaskForm::positions();
  }
  return MaskForm::diagonal(offset);
}

void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                       const S2Pattern& s2, Stream& s) {
  (void)s;
  const char* op = "attention_forward";
  Mask mask;
  AttentionDims n = check_inputs(q, k, v, q_positions, k_positions, causal, s2, op, mask);
  check_operand(out, op, "out");
  check_operand(lse, op, "lse");
  check_shape(out, q.shape(), q.dtype(), op, "out");
  check_shape(lse, {n.B, n.H, n.T}, q.dtype(), op, "lse");
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    attention_forward_kernel<T>(out.data<T>(), lse.data<T>(), q.data<T>(), k.data<T>(), v.data<T>(), mask, n, scale);
  });
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                        const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                        const S2Pattern& s2, Stream& s, const Tensor& delta) {
  (void)s;
  const char* op = "attention_backward";
  Mask mask;
  AttentionDims n = check_inputs(q, k, v, q_positions, k_positions, causal, s2, op, mask);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}, {&out, "out"},
                         {&lse, "lse"}})
    check_operand(*t, op, name);
  check_shape(dq, q.shape(), q.dtype(), op, "dq");
  check_shape(dk, k.shape(), q.dtype(), op, "dk");
  check_shape(dv, k.shape(), q.dtype(), op, "dv");
  check_shape(out, q.shape(), q.dtype(), op, "out");
  check_shape(lse, {n.B, n.H, n.T}, q.dtype(), op, "lse");
  if (dout.defined()) {
    check_operand(dout, op, "dout");
    check_shape(dout, q.shape(), q.dtype(), op, "dout");
  }
  if (dlse.defined()) {
    check_operand(dlse, op, "dlse");
    check_shape(dlse, {n.B, n.H, n.T}, q.dtype(), op, "dlse");
  }
  if (delta.defined()) {
    check_operand(delta, op, "delta");
    check_shape(delta, {n.B, n.H, n.T}, q.dtype(), op, "delta");
  }
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    attention_backward_kernel<T>(dq.data<T>(), dk.data<T>(), dv.data<T>(), dout.defined() ? dout.data<T>() : nullptr,
                                 dlse.defined() && !delta.defined() ? dlse.data<T>() : nullptr, q.data<T>(),
                                 k.data<T>(), v.data<T>(), out.data<T>(), lse.data<T>(),
                                 delta.defined() ? delta.data<T>() : nullptr, mask, n, scale);
  });
}

namespace {

// Checks the gate's tensors against out (B, T, H, D).
void check_gate(const OutputGate& gate, const Tensor& out, const char* op) {
  const Shape& o = out.shape();
  if (gate.z.defined()) {
    check_operand(gate.z, op, "gate z");
    const bool per_row = gate.z.dim() == 3;
    check_shape(gate.z, per_row ? Shape{o[0], o[1], o[2]} : o, out.dtype(), op, "gate z");
  }
  if (gate.w.defined()) {
    check_operand(gate.w, op, "gate w");
    check_shape(gate.w, {o[0], o[1], o[2]}, out.dtype(), op, "gate w");
  }
}

template <typename Acc>
Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + std::exp(-x));
}

}  // namespace

void attention_forward_gated(Tensor& out, Tensor& ungated, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, const OutputGate& gate, const Tensor& q_positions,
                             const Tensor& k_positions, double scale, bool causal, const S2Pattern& s2, Stream& s) {
  const char* op = "attention_forward_gated";
  check_operand(out, op, "out");
  check_shape(out, q.shape(), q.dtype(), op, "out");
  check_gate(gate, out, op);
  Tensor o = Tensor::empty(q.shape(), q.dtype(), q.device());
  attention_forward(o, lse, q, k, v, q_positions, k_positions, scale, causal, s2, s);
  const int64_t rows = q.numel() / std::max<int64_t>(1, q.size(-1)), D = q.size(-1);
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    const T* z = gate.z.defined() ? gate.z.data<T>() : nullptr;
    const T* w = gate.w.defined() ? gate.w.data<T>() : nullptr;
    const bool per_row = gate.z_per_row();
    const T* src = o.data<T>();
    T* dst = out.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      T row_gate = w != nullptr ? w[r] : T(1);
      if (z != nullptr && per_row) row_gate *= sigmoid<T>(z[r]);
      for (int64_t e = r * D; e < (r + 1) * D; ++e)
        dst[e] = src[e] * (z != nullptr && !per_row ? row_gate * sigmoid<T>(z[e]) : row_gate);
    }
  });
  ungated = gate.w.defined() ? o : Tensor();
}

void attention_gate_prepass(Tensor& dout, Tensor& dz, Tensor& dw, Tensor& delta, const Tensor& dy, const Tensor& y,
                            const Tensor& ungated, const Tensor& dlse, const OutputGate& gate) {
  const char* op = "attention_gate_prepass";
  check_operand(y, op, "y");
  LOOM_CHECK(y.dim() == 4) << op << ": y " << shape_str(y.shape()) << " must be (B, T, H, D)";
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&dout, "dout"}, {&dy, "dy"}}) {
    check_operand(*t, op, name);
    check_shape(*t, y.shape(), y.dtype(), op, name);
  }
  check_gate(gate, y, op);
  const int64_t B = y.size(0), T_ = y.size(1), H = y.size(2), D = y.size(3), rows = B * T_ * H;
  const Shape row_shape{B, T_, H}, stat_shape{B, H, T_};
  if (dz.defined()) check_shape(dz, gate.z.shape(), y.dtype(), op, "dz");
  if (dw.defined()) {
    check_shape(dw, row_shape, y.dtype(), op, "dw");
    check_operand(ungated, op, "ungated");
    check_shape(ungated, y.shape(), y.dtype(), op, "ungated");
  }
  if (delta.defined()) check_shape(delta, stat_shape, y.dtype(), op, "delta");
  if (dlse.defined()) check_shape(dlse, stat_shape, y.dtype(), op, "dlse");
  LOOM_DISPATCH_FLOAT(y.dtype(), T, [&] {
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* z = gate.z.defined() ? gate.z.data<T>() : nullptr;
    const T* w = gate.w.defined() ? gate.w.data<T>() : nullptr;
    const T* o = dw.defined() ? ungated.data<T>() : nullptr;
    const T *dyp = dy.data<T>(), *yp = y.data<T>(), *dl = dlse.defined() ? dlse.data<T>() : nullptr;
    T* dop = dout.data<T>();
    T* dzp = dz.defined() ? dz.data<T>() : nullptr;
    T* dwp = dw.defined() ? dw.data<T>() : nullptr;
    T* dp = delta.defined() ? delta.data<T>() : nullptr;
    const bool per_row = gate.z_per_row();
    for (int64_t r = 0; r < rows; ++r) {
      const Acc wr = w != nullptr ? static_cast<Acc>(w[r]) : Acc(1);
      const Acc zr = z != nullptr && per_row ? sigmoid<Acc>(static_cast<Acc>(z[r])) : Acc(1);
      Acc dyy = 0, dyo = 0;  // sums over the row of dy y and dy o sigmoid(z)
      for (int64_t e = r * D; e < (r + 1) * D; ++e) {
        const Acc dye = static_cast<Acc>(dyp[e]), dyye = dye * static_cast<Acc>(yp[e]);
        Acc ge = zr;  // sigmoid(z) of this element
        if (z != nullptr && !per_row) {
          ge = sigmoid<Acc>(static_cast<Acc>(z[e]));
          if (dzp != nullptr) dzp[e] = static_cast<T>((1 - ge) * dyye);
        }
        dyy += dyye;
        if (o != nullptr) dyo += dye * static_cast<Acc>(o[e]) * ge;
        dop[e] = static_cast<T>(dye * ge * wr);
      }
      if (dzp != nullptr && per_row) dzp[r] = static_cast<T>((1 - zr) * dyy);
      if (dwp != nullptr) dwp[r] = static_cast<T>(dyo);
      if (dp != nullptr) {
        const int64_t h = r % H, i = (r / H) % T_, b = r / (H * T_), row = (b * H + h) * T_ + i;
        dp[row] = static_cast<T>(dyy - (dl != nullptr ? static_cast<Acc>(dl[row]) : Acc(0)));
      }
    }
  });
}

void attention_backward_gated(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dz, Tensor& dw, const Tensor& dy,
                              const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                              const Tensor& ungated, const Tensor& lse, const OutputGate& gate,
                              const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                              const S2Pattern& s2, Stream& s) {
  Tensor dout = Tensor::empty(q.shape(), q.dtype(), q.device());
  // y alone (the sigmoid gate): the pre-pass gives delta; with o kept, the plain backward does.
  Tensor delta = ungated.defined() ? Tensor() : Tensor::empty({q.size(0), q.size(2), q.size(1)}, q.dtype(), q.device());
  attention_gate_prepass(dout, dz, dw, delta, dy, y, ungated, delta.defined() ? dlse : Tensor(), gate);
  attention_backward(dq, dk, dv, dout, delta.defined() ? Tensor() : dlse, q, k, v, ungated.defined() ? ungated : y,
                     lse, q_positions, k_positions, scale, causal, s2, s, delta);
}

}  // namespace loom::cpu
