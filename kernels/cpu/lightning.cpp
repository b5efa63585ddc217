// Lightning attention CPU kernels: one (batch, head) pair per OpenMP iteration,
// each with its own (D, D) state in a per-iteration buffer, so every output is
// written by one thread in a fixed order (deterministic).
//
// Blocked form, for a block of n <= Bk tokens with local indices i, j and the
// state S before the block (p[m] = gamma^m):
//   o_i     = s_o * (sum_{j<=i} p[i-j] (q_i.k_j) v_j + p[i+1] q_i S)
//   S'      = p[n] S + sum_j p[n-1-j] k_j^T v_j
// Backward (G = dL/dS' is carried backwards through the blocks, starting at dS_final):
//   dq_i    = s_o * (sum_{j<=i} p[i-j] (do_i.v_j) k_j + p[i+1] S do_i)      forward-order pass
//   dk_j    = s_o * sum_{i>=j} p[i-j] (do_i.v_j) q_i + p[n-1-j] G v_j      reverse pass
//   dv_j    = s_o * sum_{i>=j} p[i-j] (q_i.k_j) do_i + p[n-1-j] G^T k_j
//   dL/dS   = p[n] G + s_o * sum_i p[i+1] q_i^T do_i
// The recurrent form is the same with n = 1 per step. Powers come from
// exp(-lambda * m) directly (not repeated products), so both forms see the
// same gamma^m. Sums run in the element type (float state for f32, as the GPU
// keeps an fp32 state; double for f64).
#include "kernels/cpu/lightning.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace loom::cpu {

namespace {

constexpr int64_t kParallelWork = 1 << 15;  // multiply-adds below which threads are not worth starting

struct LightningDims {
  int64_t B, T, H, D;
  int64_t row_stride() const { return H * D; }                                    // token t -> t + 1 in one head
  int64_t head_offset(int64_t b, int64_t h) const { return (b * T * H + h) * D; }  // q, k, v, out at t = 0
  int64_t state_offset(int64_t b, int64_t h) const { return (b * H + h) * D * D; }
};

// One head's view: token rows of q, k, v (and their gradients) `stride` apart.
template <typename T>
struct HeadRows {
  T* base;
  int64_t stride;
  T* operator()(int64_t t) const { return base + t * stride; }
};

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T total = 0;
  for (int64_t d = 0; d < n; ++d) total += a[d] * b[d];
  return total;
}

// gamma^m for m = 0..n.
template <typename T>
std::vector<T> decay_powers(double lambda, int64_t n) {
  std::vector<T> p(static_cast<size_t>(n + 1));
  for (int64_t m = 0; m <= n; ++m) p[m] = static_cast<T>(std::exp(-lambda * static_cast<double>(m)));
  return p;
}

// S = decay * S + weight * a^T b  (a indexes rows, b columns).
template <typename T>
inline void decay_and_add_outer(T* S, T decay, T weight, const T* a, const T* b, int64_t D) {
  for (int64_t r = 0; r < D; ++r) {
    T ar = weight * a[r];
    T* row = S + r * D;
    for (int64_t c = 0; c < D; ++c) row[c] = decay * row[c] + ar * b[c];
  }
}

// y[c] += scale * sum_r x[r] S[r][c]   (x S)
template <typename T>
inline void add_row_times_state(T* y, T scale, const T* x, const T* S, int64_t D) {
  for (int64_t r = 0; r < D; ++r) {
    T xr = scale * x[r];
    const T* row = S + r * D;
    for (int64_t c = 0; c < D; ++c) y[c] += xr * row[c];
  }
}

// y[r] += scale * sum_c S[r][c] x[c]   (S x)
template <typename T>
inline void add_state_times_col(T* y, T scale, const T* S, const T* x, int64_t D) {
  for (int64_t r = 0; r < D; ++r) y[r] += scale * dot(S + r * D, x, D);
}

template <typename T>
void forward_head(HeadRows<T> o, T* s_final, HeadRows<const T> q, HeadRows<const T> k, HeadRows<const T> v,
                  const T* s0, double lambda, T so, int64_t Tn, int64_t D, int64_t Bk) {
  std::vector<T> S(static_cast<size_t>(D * D), T(0)), acc(static_cast<size_t>(D));
  if (s0) std::copy(s0, s0 + D * D, S.begin());
  if (Bk == 0) {  // recurrent oracle
    T gamma = static_cast<T>(std::exp(-lambda));
    for (int64_t t = 0; t < Tn; ++t) {
      decay_and_add_outer(S.data(), gamma, T(1), k(t), v(t), D);
      std::fill(acc.begin(), acc.end(), T(0));
      add_row_times_state(acc.data(), so, q(t), S.data(), D);
      std::copy(acc.begin(), acc.end(), o(t));
    }
  } else {
    std::vector<T> p = decay_powers<T>(lambda, Bk);
    for (int64_t t0 = 0; t0 < Tn; t0 += Bk) {
      int64_t n = std::min(Bk, Tn - t0);
      for (int64_t i = 0; i < n; ++i) {
        const T* qi = q(t0 + i);
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t j = 0; j <= i; ++j) {  // intra: [(Q K^T) . Gamma] V
          T w = p[i - j] * dot(qi, k(t0 + j), D);
          const T* vj = v(t0 + j);
          for (int64_t c = 0; c < D; ++c) acc[c] += w * vj[c];
        }
        add_row_times_state(acc.data(), p[i + 1], qi, S.data(), D);  // inter: gamma^(i+1) q_i S
        T* oi = o(t0 + i);
        for (int64_t c = 0; c < D; ++c) oi[c] = so * acc[c];
      }
      for (int64_t r = 0; r < D * D; ++r) S[r] *= p[n];  // state: gamma^n S + sum_j gamma^(n-1-j) k_j^T v_j
      for (int64_t j = 0; j < n; ++j) decay_and_add_outer(S.data(), T(1), p[n - 1 - j], k(t0 + j), v(t0 + j), D);
    }
  }
  std::copy(S.begin(), S.end(), s_final);
}

template <typename T>
void backward_head(HeadRows<T> dq, HeadRows<T> dk, HeadRows<T> dv, T* ds0, HeadRows<const T> dout, const T* ds_final,
                   HeadRows<const T> q, HeadRows<const T> k, HeadRows<const T> v, const T* s0, double lambda, T so,
                   int64_t Tn, int64_t D, int64_t Bk) {
  std::vector<T> S(static_cast<size_t>(D * D), T(0)), acc(static_cast<size_t>(D)), acc2(static_cast<size_t>(D));
  if (s0) std::copy(s0, s0 + D * D, S.begin());
  std::vector<T> G(static_cast<size_t>(D * D), T(0));  // dL/d(state after the current position)
  if (ds_final) std::copy(ds_final, ds_final + D * D, G.begin());
  if (Bk == 0) {
    T gamma = static_cast<T>(std::exp(-lambda));
    for (int64_t t = 0; t < Tn; ++t) {  // forward order: dq_t = s_o S_t do_t
      decay_and_add_outer(S.data(), gamma, T(1), k(t), v(t), D);
      std::fill(acc.begin(), acc.end(), T(0));
      add_state_times_col(acc.data(), so, S.data(), dout(t), D);
      std::copy(acc.begin(), acc.end(), dq(t));
    }
    for (int64_t t = Tn - 1; t >= 0; --t) {  // reverse: G_t = gamma G_{t+1} + s_o q_t^T do_t
      decay_and_add_outer(G.data(), T(1), so, q(t), dout(t), D);
      std::fill(acc.begin(), acc.end(), T(0));
      add_state_times_col(acc.data(), T(1), G.data(), v(t), D);  // dk_t = G v_t
      std::copy(acc.begin(), acc.end(), dk(t));
      std::fill(acc.begin(), acc.end(), T(0));
      add_row_times_state(acc.data(), T(1), k(t), G.data(), D);  // dv_t = G^T k_t
      std::copy(acc.begin(), acc.end(), dv(t));
      for (int64_t r = 0; r < D * D; ++r) G[r] *= gamma;
    }
  } else {
    std::vector<T> p = decay_powers<T>(lambda, Bk);
    for (int64_t t0 = 0; t0 < Tn; t0 += Bk) {  // forward order: dq, recomputing the state before each block
      int64_t n = std::min(Bk, Tn - t0);
      for (int64_t i = 0; i < n; ++i) {
        const T* doi = dout(t0 + i);
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t j = 0; j <= i; ++j) {
          T w = p[i - j] * dot(doi, v(t0 + j), D);
          const T* kj = k(t0 + j);
          for (int64_t a = 0; a < D; ++a) acc[a] += w * kj[a];
        }
        add_state_times_col(acc.data(), p[i + 1], S.data(), doi, D);
        T* dqi = dq(t0 + i);
        for (int64_t a = 0; a < D; ++a) dqi[a] = so * acc[a];
      }
      for (int64_t r = 0; r < D * D; ++r) S[r] *= p[n];
      for (int64_t j = 0; j < n; ++j) decay_and_add_outer(S.data(), T(1), p[n - 1 - j], k(t0 + j), v(t0 + j), D);
    }
    int64_t n_blocks = (Tn + Bk - 1) / Bk;
    for (int64_t blk = n_blocks - 1; blk >= 0; --blk) {  // reverse: dk, dv, carrying G
      int64_t t0 = blk * Bk, n = std::min(Bk, Tn - t0);
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = k(t0 + j);
        const T* vj = v(t0 + j);
        std::fill(acc.begin(), acc.end(), T(0));   // dk_j
        std::fill(acc2.begin(), acc2.end(), T(0));  // dv_j
        for (int64_t i = j; i < n; ++i) {
          const T* qi = q(t0 + i);
          const T* doi = dout(t0 + i);
          T wk = p[i - j] * dot(doi, vj, D), wv = p[i - j] * dot(qi, kj, D);
          for (int64_t d = 0; d < D; ++d) {
            acc[d] += wk * qi[d];
            acc2[d] += wv * doi[d];
          }
        }
        for (int64_t d = 0; d < D; ++d) {
          acc[d] *= so;
          acc2[d] *= so;
        }
        add_state_times_col(acc.data(), p[n - 1 - j], G.data(), vj, D);
        add_row_times_state(acc2.data(), p[n - 1 - j], kj, G.data(), D);
        std::copy(acc.begin(), acc.end(), dk(t0 + j));
        std::copy(acc2.begin(), acc2.end(), dv(t0 + j));
      }
      for (int64_t r = 0; r < D * D; ++r) G[r] *= p[n];  // dL/dS before the block
      for (int64_t i = 0; i < n; ++i) decay_and_add_outer(G.data(), T(1), so * p[i + 1], q(t0 + i), dout(t0 + i), D);
    }
  }
  if (ds0) std::copy(G.begin(), G.end(), ds0);
}

// Multiply-adds of one pass, to decide whether threads are worth starting.
int64_t pass_work(const LightningDims& n, int64_t block_size) {
  return n.B * n.H * n.T * n.D * (std::max<int64_t>(block_size, 1) + n.D);
}

template <typename T>
void forward_all(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& initial_state, const std::vector<double>& lambdas, double out_scale, int64_t block_size,
                 const LightningDims& n) {
  const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
  const T* s0 = initial_state.defined() ? initial_state.data<T>() : nullptr;
  T *outp = out.data<T>(), *sf = final_state.data<T>();
  int64_t stride = n.row_stride();
#pragma omp parallel for collapse(2) schedule(static) if (pass_work(n, block_size) > kParallelWork)
  for (int64_t b = 0; b < n.B; ++b)
    for (int64_t h = 0; h < n.H; ++h) {
      int64_t off = n.head_offset(b, h), soff = n.state_offset(b, h);
      forward_head<T>({outp + off, stride}, sf + soff, {qp + off, stride}, {kp + off, stride}, {vp + off, stride},
                      s0 ? s0 + soff : nullptr, lambdas[h], static_cast<T>(out_scale), n.T, n.D, block_size);
    }
}

template <typename T>
void backward_all(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                  const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& initial_state, const std::vector<double>& lambdas, double out_scale,
                  int64_t block_size, const LightningDims& n) {
  const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>(), *dop = dout.data<T>();
  const T* s0 = initial_state.defined() ? initial_state.data<T>() : nullptr;
  const T* dsf = dfinal_state.defined() ? dfinal_state.data<T>() : nullptr;
  T *dqp = dq.data<T>(), *dkp = dk.data<T>(), *dvp = dv.data<T>();
  T* ds0 = dinitial_state.defined() ? dinitial_state.data<T>() : nullptr;
  int64_t stride = n.row_stride();
#pragma omp parallel for collapse(2) schedule(static) if (2 * pass_work(n, block_size) > kParallelWork)
  for (int64_t b = 0; b < n.B; ++b)
    for (int64_t h = 0; h < n.H; ++h) {
      int64_t off = n.head_offset(b, h), soff = n.state_offset(b, h);
      backward_head<T>({dqp + off, stride}, {dkp + off, stride}, {dvp + off, stride}, ds0 ? ds0 + soff : nullptr,
                       {dop + off, stride}, dsf ? dsf + soff : nullptr, {qp + off, stride}, {kp + off, stride},
                       {vp + off, stride}, s0 ? s0 + soff : nullptr, lambdas[h], static_cast<T>(out_scale), n.T, n.D,
                       block_size);
    }
}

void check_operand(const Tensor& t, const char* op, const char* name) {
  LOOM_CHECK(t.defined()) << op << ": " << name << " is undefined";
  LOOM_CHECK(t.device().is_cpu()) << op << ": CPU kernel given " << name << " on " << t.device();
  LOOM_CHECK(t.is_contiguous()) << op << ": " << name << " must be contiguous, shape " << shape_str(t.shape())
                                << " strides " << shape_str(t.strides());
}

void check_shape(const Tensor& t, const Shape& shape, DType dtype, const char* op, const char* name) {
  check_operand(t, op, name);
  LOOM_CHECK(t.shape() == shape) << op << ": " << name << " shape " << shape_str(t.shape()) << ", expected "
                                 << shape_str(shape);
  LOOM_CHECK(t.dtype() == dtype) << op << ": " << name << " dtype " << t.dtype() << ", expected " << dtype;
}

// Validates q, k, v, the decays and the scalars; returns the dims and the decay rates.
LightningDims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& initial_state,
                           const Tensor& decay_lambdas, double out_scale, int64_t block_size, const char* op,
                           std::vector<double>& lambdas) {
  check_operand(q, op, "q");
  LOOM_CHECK(q.dim() == 4) << op << ": q shape " << shape_str(q.shape()) << " must be (B, T, H, D)";
  LOOM_CHECK(q.dtype() == DType::f32 || q.dtype() == DType::f64) << op << ": q must be f32 or f64, got " << q.dtype();
  LightningDims n{q.size(0), q.size(1), q.size(2), q.size(3)};
  check_shape(k, q.shape(), q.dtype(), op, "k");
  check_shape(v, q.shape(), q.dtype(), op, "v");
  if (initial_state.defined()) check_shape(initial_state, {n.B, n.H, n.D, n.D}, q.dtype(), op, "initial_state");
  LOOM_CHECK(decay_lambdas.defined()) << op << ": decay_lambdas are undefined";
  LOOM_CHECK(decay_lambdas.device().is_cpu()) << op << ": decay_lambdas must be on the CPU, got "
                                              << decay_lambdas.device();
  LOOM_CHECK(decay_lambdas.dim() == 1 && decay_lambdas.size(0) == n.H)
      << op << ": decay_lambdas shape " << shape_str(decay_lambdas.shape()) << " must be (H) = " << shape_str({n.H});
  LOOM_CHECK(is_floating(decay_lambdas.dtype())) << op << ": decay_lambdas must be floating, got "
                                                 << decay_lambdas.dtype();
  lambdas = decay_lambdas.to(DType::f64).to_vector<double>();
  for (size_t h = 0; h < lambdas.size(); ++h)
    LOOM_CHECK(std::isfinite(lambdas[h]) && lambdas[h] >= 0.0)
        << op << ": decay_lambdas[" << h << "] = " << lambdas[h] << " must be finite and >= 0";
  LOOM_CHECK(std::isfinite(out_scale)) << op << ": out_scale = " << out_scale << " is not finite";
  LOOM_CHECK(block_size >= 0) << op << ": block_size = " << block_size << " must be >= 0 (0 = recurrent)";
  return n;
}

}  // namespace

void lightning_forward(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                       int64_t block_size, Stream& s) {
  (void)s;
  const char* op = "lightning_forward";
  std::vector<double> lambdas;
  LightningDims n = check_inputs(q, k, v, initial_state, decay_lambdas, out_scale, block_size, op, lambdas);
  check_shape(out, q.shape(), q.dtype(), op, "out");
  check_shape(final_state, {n.B, n.H, n.D, n.D}, q.dtype(), op, "final_state");
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    forward_all<T>(out, final_state, q, k, v, initial_state, lambdas, out_scale, block_size, n);
  });
}

void lightning_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                        const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                        int64_t block_size, Stream& s) {
  (void)s;
  const char* op = "lightning_backward";
  std::vector<double> lambdas;
  LightningDims n = check_inputs(q, k, v, initial_state, decay_lambdas, out_scale, block_size, op, lambdas);
  Shape state_shape{n.B, n.H, n.D, n.D};
  check_shape(dq, q.shape(), q.dtype(), op, "dq");
  check_shape(dk, q.shape(), q.dtype(), op, "dk");
  check_shape(dv, q.shape(), q.dtype(), op, "dv");
  if (dinitial_state.defined()) check_shape(dinitial_state, state_shape, q.dtype(), op, "dinitial_state");
  if (dfinal_state.defined()) check_shape(dfinal_state, state_shape, q.dtype(), op, "dfinal_state");
  // An undefined dout is zero; materialized so the kernel has one path.
  Tensor dout_or_zero = dout.defined() ? dout : Tensor::zeros(q.shape(), q.dtype());  // (B, T, H, D)
  check_shape(dout_or_zero, q.shape(), q.dtype(), op, "dout");
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    backward_all<T>(dq, dk, dv, dinitial_state, dout_or_zero, dfinal_state, q, k, v, initial_state, lambdas, out_scale,
                    block_size, n);
  });
}

}  // namespace loom::cpu
