// MoH's head gate for one token (ALGORITHMS.md §8), forward and backward, as
// host/device functions shared by the CPU twin (kernels/cpu/moe.cpp) and the
// CUDA kernel (kernels/cuda/moe.cu), so the rule is written once:
//   g_r = k · (p ∘ m) / Σ (p ∘ m)                  (E routed heads; m the top-k mask)
//   g_s = h_s · softmax(z_s)   (shared > 1; else the single shared head's 1)
//   α   = 2 · softmax(z_a)     (shared > 0)
//   gate = [α_0 · g_s, α_1 · g_r]  (shared > 0), else g_r.
// z holds the row's shared-router logits z_s (h_s = shared > 1 ? shared : 0
// entries) then the two mix logits z_a; unused when shared == 0. Arithmetic in
// T (f32 or f64), one rounding per operation in the order written.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "framework/error.h"
#include "framework/host_device.h"
#include "framework/tensor.h"

namespace loom::moh {

template <typename T>
LOOM_HOST_DEVICE inline T exp_of(T x) {
  if constexpr (std::is_same_v<T, float>) return expf(x);
  else return exp(x);
}

// sm[0..n) = softmax(z[0..n)) (max subtracted).
template <typename T>
LOOM_HOST_DEVICE inline void softmax_small(T* sm, const T* z, int64_t n) {
  T mx = z[0];
  for (int64_t j = 1; j < n; ++j) mx = z[j] > mx ? z[j] : mx;
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    sm[j] = exp_of(z[j] - mx);
    sum += sm[j];
  }
  for (int64_t j = 0; j < n; ++j) sm[j] = sm[j] / sum;
}

constexpr int64_t kMaxShared = 64;  // shared heads a row's scratch holds (checked by the callers)

// gate (shared + E) of one row.
template <typename T>
LOOM_HOST_DEVICE inline void gate_row(T* gate, const T* p, const T* m, const T* z, int64_t E, int64_t shared,
                                      int64_t k) {
  T s = 0;
  for (int64_t i = 0; i < E; ++i) s += p[i] * m[i];
  T* g_r = gate + shared;
  for (int64_t i = 0; i < E; ++i) g_r[i] = (p[i] * m[i]) / s * static_cast<T>(k);
  if (shared == 0) return;
  const int64_t hs = shared > 1 ? shared : 0;
  T alpha[2];
  softmax_small(alpha, z + hs, 2);
  alpha[0] *= 2;
  alpha[1] *= 2;
  if (hs > 0) {
    softmax_small(gate, z, hs);
    for (int64_t j = 0; j < hs; ++j) gate[j] = alpha[0] * (gate[j] * static_cast<T>(hs));
  } else {
    gate[0] = alpha[0];
  }
  for (int64_t i = 0; i < E; ++i) g_r[i] = alpha[1] * g_r[i];
}

// dp (E) and dz (h_s + 2; unused when shared == 0) of one row from dgate (shared + E).
template <typename T>
LOOM_HOST_DEVICE inline void gate_row_backward(T* dp, T* dz, const T* dgate, const T* p, const T* m, const T* z,
                                               int64_t E, int64_t shared, int64_t k) {
  T s = 0;
  for (int64_t i = 0; i < E; ++i) s += p[i] * m[i];
  const T kk = static_cast<T>(k);
  // dg_r (the gradient reaching g_r) and Σ dg_r · g_r, with g_r recomputed.
  T alpha[2] = {1, 1}, dalpha1 = 0;
  if (shared > 0) {
    softmax_small(alpha, z + (shared > 1 ? shared : 0), 2);
    alpha[0] *= 2;
    alpha[1] *= 2;
  }
  T dot = 0;
  for (int64_t i = 0; i < E; ++i) {
    const T g_r = (p[i] * m[i]) / s * kk;
    const T dg_r = shared > 0 ? alpha[1] * dgate[shared + i] : dgate[i];
    dot += dg_r * g_r;
    if (shared > 0) dalpha1 += dgate[shared + i] * g_r;
  }
  for (int64_t i = 0; i < E; ++i) {
    const T dg_r = shared > 0 ? alpha[1] * dgate[shared + i] : dgate[i];
    dp[i] = m[i] * kk / s * (dg_r - dot / kk);
  }
  if (shared == 0) return;
  const int64_t hs = shared > 1 ? shared : 0;
  T dalpha0 = 0;
  if (hs > 0) {
    T sig[kMaxShared];
    softmax_small(sig, z, hs);
    T inner = 0;  // Σ σ_j · dσ_j with dσ_j = h_s · α_0 · dgate_j
    for (int64_t j = 0; j < hs; ++j) {
      dalpha0 += dgate[j] * (sig[j] * static_cast<T>(hs));
      inner += sig[j] * (static_cast<T>(hs) * alpha[0] * dgate[j]);
    }
    for (int64_t j = 0; j < hs; ++j) dz[j] = sig[j] * (static_cast<T>(hs) * alpha[0] * dgate[j] - inner);
  } else {
    dalpha0 = dgate[0];
  }
  // α = 2 σ_a: dz_a = σ_a ∘ (2 dα − Σ σ_a · 2 dα).
  const T sa0 = alpha[0] / 2, sa1 = alpha[1] / 2;
  const T d0 = 2 * dalpha0, d1 = 2 * dalpha1, mean = sa0 * d0 + sa1 * d1;
  dz[hs] = sa0 * (d0 - mean);
  dz[hs + 1] = sa1 * (d1 - mean);
}

// The operands' contract (host side, for both twins): p and mask contiguous
// (N, E) of one floating dtype, `gate` (the gate, or its gradient) contiguous
// (N, shared + E), z contiguous (N, h_s + 2) when shared > 0, k in [1, E].
inline void check_gate_operands(const Tensor& gate, const Tensor& p, const Tensor& mask, const Tensor& z,
                                int64_t shared, int64_t k, const char* op) {
  LOOM_CHECK(p.defined() && p.dim() == 2 && p.is_contiguous() && mask.defined() && mask.shape() == p.shape() &&
             mask.is_contiguous() && mask.dtype() == p.dtype())
      << op << ": p and mask must be contiguous (N, E) of one dtype, got p "
      << (p.defined() ? shape_str(p.shape()) : std::string("undefined")) << ", mask "
      << (mask.defined() ? shape_str(mask.shape()) : std::string("undefined"));
  const int64_t n = p.size(0), e = p.size(1);
  LOOM_CHECK(shared >= 0 && shared <= kMaxShared && k >= 1 && k <= e)
      << op << ": shared = " << shared << " (at most " << kMaxShared << "), k = " << k << " (in [1, E = " << e
      << "])";
  LOOM_CHECK(gate.defined() && gate.is_contiguous() && gate.dtype() == p.dtype() && gate.shape() == (Shape{n, shared + e}))
      << op << ": gate must be contiguous " << p.dtype() << " (" << n << ", " << shared + e << "), got "
      << (gate.defined() ? shape_str(gate.shape()) : std::string("undefined"));
  if (shared > 0) {
    const int64_t zc = (shared > 1 ? shared : 0) + 2;
    LOOM_CHECK(z.defined() && z.is_contiguous() && z.dtype() == p.dtype() && z.shape() == (Shape{n, zc}))
        << op << ": z must be contiguous " << p.dtype() << " (" << n << ", " << zc << ") for " << shared
        << " shared heads, got " << (z.defined() ? shape_str(z.shape()) : std::string("undefined"));
  }
}

}  // namespace loom::moh
