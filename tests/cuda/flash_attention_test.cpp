// Flash attention kernels (kernels/cuda/flash_attention.cu: tensor cores, bf16,
// D = 64 and 128) against the CPU twin (kernels/cpu/attention.h) on the same
// bf16-exact inputs: T = 1, 17, 1000, 4097; GQA groups 1 and 4; full, causal
// and causal + S2 masks; queries after their keys (a ring step), zigzag
// positions, rows with no visible key; outputs poisoned with NaN first. The
// cuDNN path (kernels/cuda/cudnn_attention.h) is held to the same bounds on
// the calls it takes (dense, diagonal or no mask, no lse gradient).
//
// Tolerances follow from where the kernels round. Scores, softmax statistics
// and every accumulation are fp32 (lse is compared at fp32 precision), but P
// is rounded to bf16 as the operand of P V and P^T dO, and dS as the operand
// of dS K and dS^T Q. A round-to-nearest bf16 operand is off by at most 2^-8
// of itself (half an ulp of 8 significant bits, at the bottom of a binade), so
// an output moves by at most 2^-8 times the sum of magnitudes of the terms it
// adds up, e.g. |d out_i| <= 2^-8 sum_j p_ij |v_j|. Those sums are computed
// here in f64 (`RoundingBounds`); each element must lie within 2^-8 of its
// bound plus one bf16 rounding of the reference value itself (2^-8 of it).
// Two absolute terms join it where relative ones cannot hold: dS = P (dP -
// delta) cancels to ~0 when a row's
// keys agree, and the two fp32 sums of D exact bf16 products behind dP and
// delta are each off by at most D 2^-24 times their sums of magnitudes
// (added to dq and dk through dS); and cuDNN's GQA backward rounds each query
// head's dK and dV contribution to bf16 before summing the group (2^-9 of
// each contribution's magnitude).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/s2_pattern.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/cudnn_attention.h"
#include "kernels/cuda/key_blocks.h"
#include "kernels/cuda/wgmma_check.h"
#include "kernels/dispatch.h"
#include "tests/cuda/attention_testing.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using namespace cuda_testing;  // tests/cuda/cuda_testing.h

struct Case {
  int64_t B, T, S, H, Hkv, D;
  bool causal, s2;
  Positions positions = Positions::arange;
};

// Per element, the sum of magnitudes of the terms each output adds with a
// bf16-rounded factor (see the file comment); inputs f32 on the host, out and
// lse the GPU's (as the reference backward gets them).
struct RoundingBounds {
  Tensor out, dq, dk, dv;
  Tensor dq_abs, dk_abs, dv_abs;  // absolute terms (see the file comment)
};

RoundingBounds rounding_bounds(const Case& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                               const Tensor& dlse, const Tensor& out, const Tensor& lse, const Tensor& qp,
                               const Tensor& kp, const S2Pattern& s2, double scale, bool group_partials_rounded) {
  const std::vector<double> Q = q.to_vector<double>(), K = k.to_vector<double>(), V = v.to_vector<double>();
  const std::vector<double> dO = dout.to_vector<double>(), dL = dlse.to_vector<double>();
  const std::vector<double> O = out.to(DType::f32).to_vector<double>(), L = lse.to_vector<double>();
  const std::vector<int64_t> qpos = qp.to_vector<int64_t>(), kpos = kp.to_vector<int64_t>();
  const int64_t B = c.B, T = c.T, S = c.S, H = c.H, Hkv = c.Hkv, D = c.D, group = H / Hkv;
  std::vector<double> ob(static_cast<size_t>(B * T * H * D), 0.0), dqb(ob.size(), 0.0);
  std::vector<double> dkb(static_cast<size_t>(B * S * Hkv * D), 0.0), dvb(dkb.size(), 0.0);
  std::vector<double> dq_abs(ob.size(), 0.0), dk_abs(dkb.size(), 0.0), dv_abs(dkb.size(), 0.0);
  std::vector<double> part_k(static_cast<size_t>(S * D)), part_v(part_k.size());  // one head's dK, dV contribution
  const double gamma = static_cast<double>(D) * std::ldexp(1.0, -24), half_ulp = std::ldexp(1.0, -9);
  // Query rows in parallel (f64 over every visible pair: about 10^10 terms at T = 4097): the
  // query-side sums are each row's own; the key-side ones go to per-thread sums (indexed j D + d),
  // added into the totals after each head.
#pragma omp parallel
  {
    const size_t keys = static_cast<size_t>(S * D);
    std::vector<double> my_dk(keys), my_dv(keys), my_dk_abs(keys), my_part_k(keys), my_part_v(keys);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t hk = h / group;
        for (std::vector<double>* a : {&my_dk, &my_dv, &my_dk_abs, &my_part_k, &my_part_v})
          std::fill(a->begin(), a->end(), 0.0);
#pragma omp for schedule(dynamic, 16)
        for (int64_t i = 0; i < T; ++i) {
          const double l = L[static_cast<size_t>((b * H + h) * T + i)];
          if (!std::isfinite(l)) continue;  // no visible key: every output is exactly 0
          const double* qi = &Q[static_cast<size_t>(((b * T + i) * H + h) * D)];
          const double* doi = &dO[static_cast<size_t>(((b * T + i) * H + h) * D)];
          const double* oi = &O[static_cast<size_t>(((b * T + i) * H + h) * D)];
          double delta = -dL[static_cast<size_t>((b * H + h) * T + i)];
          for (int64_t d = 0; d < D; ++d) delta += doi[d] * oi[d];
          for (int64_t j = 0; j < S; ++j) {
            bool vis = !c.causal || kpos[static_cast<size_t>(j)] <= qpos[static_cast<size_t>(i)];
            if (vis && s2.enabled())
              vis = s2_block_active(qpos[static_cast<size_t>(i)] / s2.block, kpos[static_cast<size_t>(j)] / s2.block,
                                    hk, Hkv, s2);
            if (!vis) continue;
            const double* kj = &K[static_cast<size_t>(((b * S + j) * Hkv + hk) * D)];
            const double* vj = &V[static_cast<size_t>(((b * S + j) * Hkv + hk) * D)];
            double s = 0, dp = 0, dp_mag = 0, delta_mag = 0;
            for (int64_t d = 0; d < D; ++d) {
              s += qi[d] * kj[d];
              dp += doi[d] * vj[d];
              dp_mag += std::fabs(doi[d] * vj[d]);
              delta_mag += std::fabs(doi[d] * oi[d]);
            }
            const double pij = std::exp(scale * s - l), ds_signed = pij * (dp - delta), ds = std::fabs(ds_signed);
            const double ds_fp32 = pij * gamma * (dp_mag + delta_mag);  // fp32 error of dP - delta, times P
            for (int64_t d = 0; d < D; ++d) {
              const size_t at_q = static_cast<size_t>(((b * T + i) * H + h) * D + d);
              const size_t at = static_cast<size_t>(j * D + d);
              ob[at_q] += pij * std::fabs(vj[d]);
              dqb[at_q] += scale * ds * std::fabs(kj[d]);
              dq_abs[at_q] += scale * ds_fp32 * std::fabs(kj[d]);
              my_dv[at] += pij * std::fabs(doi[d]);
              my_dk[at] += scale * ds * std::fabs(qi[d]);
              my_dk_abs[at] += scale * ds_fp32 * std::fabs(qi[d]);
              my_part_v[at] += pij * doi[d];
              my_part_k[at] += scale * ds_signed * qi[d];
            }
          }
        }
#pragma omp single
        {
          std::fill(part_k.begin(), part_k.end(), 0.0);
          std::fill(part_v.begin(), part_v.end(), 0.0);
        }
#pragma omp critical(rounding_bounds_keys)
        for (int64_t j = 0; j < S; ++j)
          for (int64_t d = 0; d < D; ++d) {
            const size_t at_k = static_cast<size_t>(((b * S + j) * Hkv + hk) * D + d);
            const size_t at = static_cast<size_t>(j * D + d);
            dkb[at_k] += my_dk[at];
            dvb[at_k] += my_dv[at];
            dk_abs[at_k] += my_dk_abs[at];
            part_k[at] += my_part_k[at];
            part_v[at] += my_part_v[at];
          }
#pragma omp barrier
#pragma omp single
        if (group_partials_rounded && group > 1) {
          for (int64_t j = 0; j < S; ++j)
            for (int64_t d = 0; d < D; ++d) {
              const size_t at_k = static_cast<size_t>(((b * S + j) * Hkv + hk) * D + d);
              const size_t at = static_cast<size_t>(j * D + d);
              dk_abs[at_k] += half_ulp * std::fabs(part_k[at]);
              dv_abs[at_k] += half_ulp * std::fabs(part_v[at]);
            }
        }
      }
  }
  const Shape q_shape{B, T, H, D}, kv_shape{B, S, Hkv, D};
  return {Tensor::from_vector<double>(ob, q_shape),     Tensor::from_vector<double>(dqb, q_shape),
          Tensor::from_vector<double>(dkb, kv_shape),   Tensor::from_vector<double>(dvb, kv_shape),
          Tensor::from_vector<double>(dq_abs, q_shape), Tensor::from_vector<double>(dk_abs, kv_shape),
          Tensor::from_vector<double>(dv_abs, kv_shape)};
}

// |gpu - ref| <= 2^-8 (|ref| + bound) + extra + 1e-6 per element (extra: the
// absolute terms, or undefined); names the worst element.
::testing::AssertionResult within_rounding(const Tensor& gpu_tensor, const Tensor& ref, const Tensor& bound,
                                           const Tensor& extra = Tensor()) {
  const std::vector<double> g = download(gpu_tensor).to_vector<double>(), r = ref.to_vector<double>();
  const std::vector<double> bd = bound.to_vector<double>();
  const std::vector<double> ex = extra.defined() ? extra.to_vector<double>() : std::vector<double>(g.size(), 0.0);
  const double u = std::ldexp(1.0, -8);
  size_t worst = 0, bad = 0;
  double worst_ratio = 0;
  for (size_t e = 0; e < g.size(); ++e) {
    const double tol = u * (std::fabs(r[e]) + bd[e]) + ex[e] + 1e-6, err = std::fabs(g[e] - r[e]);
    const double ratio = std::isfinite(g[e]) ? err / tol : std::numeric_limits<double>::infinity();
    if (!(ratio <= 1.0)) ++bad;
    if (!(ratio <= worst_ratio)) {
      worst_ratio = ratio;
      worst = e;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << g.size() << " elements outside the rounding bound; worst #"
                                       << worst << ": gpu " << g[worst] << ", reference " << r[worst] << ", bound "
                                       << bd[worst] << " (error / tolerance " << worst_ratio << ")";
}

// Sets cuda::deterministic_attention for a scope.
struct DeterministicScope {
  explicit DeterministicScope(bool on) : previous(cuda::deterministic_attention()) {
    cuda::set_deterministic_attention(on);
  }
  ~DeterministicScope() { cuda::set_deterministic_attention(previous); }
  bool previous;
};

// Which implementation check_case runs: the flash kernels, or cuDNN called
// directly (so a silent fallback cannot pass for it; no lse gradient there).
enum class Engine { flash, cudnn_forward, cudnn };

void check_case(const Case& c, uint64_t seed, Engine engine = Engine::flash) {
  SCOPED_TRACE(::testing::Message() << "B " << c.B << " T " << c.T << " S " << c.S << " H " << c.H << " Hkv "
                                    << c.Hkv << " D " << c.D << " causal " << c.causal << " s2 " << c.s2
                                    << " positions " << static_cast<int>(c.positions) << " engine "
                                    << static_cast<int>(engine));
  const DType bf = DType::bf16;
  const Shape q_shape{c.B, c.T, c.H, c.D}, kv_shape{c.B, c.S, c.Hkv, c.D}, row_shape{c.B, c.H, c.T};
  Tensor q = random_rounded(q_shape, seed, bf, 1.5), k = random_rounded(kv_shape, seed + 1, bf, 1.5);
  Tensor v = random_rounded(kv_shape, seed + 2, bf), dout = random_rounded(q_shape, seed + 3, bf);
  Tensor dlse = engine == Engine::flash ? testing::random_tensor(row_shape, seed + 4, DType::f32, 0.5)
                                        : Tensor::zeros(row_shape, DType::f32);
  Tensor qp, kp;
  make_positions(c.positions, c.T, c.S, seed + 5, qp, kp);
  S2Pattern s2;
  if (c.s2) s2 = S2Pattern{64, 2, 4};
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));

  Tensor qg = q.to(bf).to(gpu()), kg = k.to(bf).to(gpu()), vg = v.to(bf).to(gpu());
  ASSERT_TRUE(cuda::flash_attention_applies(qg, kg, vg));
  Tensor qpg = qp.to(gpu()), kpg = kp.to(gpu());
  Tensor out = poisoned(q_shape, bf), lse = poisoned(row_shape, DType::f32);
  int64_t diagonal = 0;
  if (engine == Engine::flash) {
    cuda::attention_forward(out, lse, qg, kg, vg, qpg, kpg, scale, c.causal, s2, gpu_stream(),
                            cuda::AttentionKernel::flash);
  } else {
    const cpu::MaskForm form = cpu::mask_form(qp.data<int64_t>(), c.T, kp.data<int64_t>(), c.S, c.causal);
    ASSERT_TRUE(form.is_diagonal()) << "a case cuDNN cannot take";
    diagonal = form.offset;
    ASSERT_TRUE(cuda::cudnn_attention_forward(out, lse, qg, kg, vg, diagonal, scale, gpu_stream()))
        << cuda::cudnn_attention_last_error();
  }
  Tensor out_ref = Tensor::empty(q_shape), lse_ref = Tensor::empty(row_shape);
  cpu::attention_forward(out_ref, lse_ref, q, k, v, qp, kp, scale, c.causal, s2, cpu_stream());
  EXPECT_TRUE(testing::tensors_close(lse.to(Device::cpu()), lse_ref, 1e-5, 1e-5)) << "lse";

  // Backward on identical inputs: the reference gets the GPU's out and lse.
  Tensor out_f32 = out.to(Device::cpu()).to(DType::f32), lse_f32 = lse.to(Device::cpu());
  Tensor dq_ref = Tensor::empty(q_shape), dk_ref = Tensor::empty(kv_shape), dv_ref = Tensor::empty(kv_shape);
  cpu::attention_backward(dq_ref, dk_ref, dv_ref, dout, dlse, q, k, v, out_f32, lse_f32, qp, kp, scale, c.causal, s2,
                          cpu_stream());
  Tensor doutg = dout.to(bf).to(gpu()), dlseg = dlse.to(gpu());
  const RoundingBounds bound =
      rounding_bounds(c, q, k, v, dout, dlse, out, lse_f32, qp, kp, s2, scale, engine != Engine::flash);
  EXPECT_TRUE(within_rounding(out, out_ref, bound.out)) << "out";
  if (engine == Engine::cudnn_forward) return;
  // The flash backward both ways: fused (dQ by atomics) and deterministic (two kernels).
  for (bool deterministic : {false, true}) {
    if (engine != Engine::flash && deterministic) break;
    SCOPED_TRACE(deterministic ? "deterministic backward" : "fused backward");
    Tensor dq = poisoned(q_shape, bf), dk = poisoned(kv_shape, bf), dv = poisoned(kv_shape, bf);
    if (engine == Engine::flash) {
      const DeterministicScope scope(deterministic);
      cuda::attention_backward(dq, dk, dv, doutg, dlseg, qg, kg, vg, out, lse, qpg, kpg, scale, c.causal, s2,
                               gpu_stream(), cuda::AttentionKernel::flash);
    } else {
      ASSERT_TRUE(
          cuda::cudnn_attention_backward(dq, dk, dv, doutg, qg, kg, vg, out, lse, diagonal, scale, gpu_stream()))
          << cuda::cudnn_attention_last_error();
    }
    EXPECT_TRUE(within_rounding(dq, dq_ref, bound.dq, bound.dq_abs)) << "dq";
    EXPECT_TRUE(within_rounding(dk, dk_ref, bound.dk, bound.dk_abs)) << "dk";
    EXPECT_TRUE(within_rounding(dv, dv_ref, bound.dv, bound.dv_abs)) << "dv";
  }
}

// The kernel families the flash calls can take on this machine: the warpgroup (wgmma) kernels
// where the build and GPU have them, and always the mma.sync ones (LOOM_FLASH_WGMMA=0).
struct FlashFamily {
  explicit FlashFamily(bool wgmma) { setenv("LOOM_FLASH_WGMMA", wgmma ? "1" : "0", 1); }
  ~FlashFamily() { unsetenv("LOOM_FLASH_WGMMA"); }
  FlashFamily(const FlashFamily&) = delete;
  FlashFamily& operator=(const FlashFamily&) = delete;
};
std::vector<bool> flash_families() {
  if (cuda::detail::wgmma_available()) return {true, false};
  return {false};
}

TEST(CudaFlashAttention, MatchesTheCpuTwinOverLengthsHeadDimsGroupsAndMasks) {
  LOOM_SKIP_WITHOUT_GPU();
  for (bool wgmma : flash_families()) {
    SCOPED_TRACE(wgmma ? "wgmma kernels" : "mma.sync kernels");
    const FlashFamily family(wgmma);
    uint64_t seed = 7000;
    for (int64_t T : {1, 17, 1000})
      for (int64_t D : {64, 128})
        for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 1}})
          for (int mask = 0; mask < 3; ++mask) {
            check_case(Case{1, T, T, H, Hkv, D, mask > 0, mask == 2}, seed);
            seed += 10;
          }
  }
}

TEST(CudaFlashAttention, MatchesTheCpuTwinOnLongRowsPositionsAndBatches) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 9000;
  const Case cases[] = {
      {1, 4097, 4097, 2, 2, 64, true, false, Positions::arange},        // T past a tile multiple, long rows
      {1, 4097, 4097, 4, 1, 128, false, false, Positions::arange},      // full attention, GQA 4
      {2, 65, 1000, 4, 2, 64, true, false, Positions::query_suffix},    // a query block after its keys
      {1, 200, 1000, 2, 1, 128, true, true, Positions::query_suffix},   // S2 with tiles across S2 blocks
      {1, 1000, 1000, 4, 4, 128, true, false, Positions::zigzag},       // zigzag: tiles with mixed positions
      {1, 1000, 1000, 4, 1, 64, true, true, Positions::zigzag},         // S2 on zigzag positions
      {1, 1000, 1000, 2, 2, 64, false, true, Positions::arange},        // S2 without causal
      {1, 1100, 1100, 2, 1, 128, true, true, Positions::arange},        // S2: 2 chunks of paired key tiles + a tail
      {2, 130, 130, 2, 2, 128, true, false, Positions::late_keys},      // rows with no visible key
  };
  for (bool wgmma : flash_families()) {
    SCOPED_TRACE(wgmma ? "wgmma kernels" : "mma.sync kernels");
    const FlashFamily family(wgmma);
    for (const Case& c : cases) {
      check_case(c, seed);
      seed += 10;
    }
  }
}

// ---- the output gate (cpu::OutputGate): out = o * sigmoid(z) * w in the forward's epilogue, its
// gradient in the backward's pre-pass.

// The gate forms: z per (token, head) row or per element, w per row.
struct GateForm {
  const char* name;
  bool z, z_per_row, w;
};
constexpr GateForm kGateForms[] = {{"headwise z", true, true, false},
                                   {"elementwise z", true, false, false},
                                   {"w", false, true, true},
                                   {"headwise z and w", true, true, true},
                                   {"elementwise z and w", true, false, true}};

// |a - b| <= rel * scale + 1e-6 per element (scale: a per-element magnitude); names the worst.
::testing::AssertionResult within(const std::vector<double>& a, const std::vector<double>& b,
                                  const std::vector<double>& scale, double rel, const char* what) {
  size_t bad = 0, worst = 0;
  double worst_ratio = 0;
  for (size_t e = 0; e < a.size(); ++e) {
    const double ratio = std::fabs(a[e] - b[e]) / (rel * scale[e] + 1e-6);
    if (!(ratio <= 1.0)) ++bad;
    if (!(ratio <= worst_ratio)) worst_ratio = ratio, worst = e;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << a.size() << " elements off; worst #" << worst
                                       << ": " << a[worst] << " against " << b[worst] << " (error / tolerance "
                                       << worst_ratio << ")";
}

std::vector<double> magnitudes(const Tensor& t) {
  std::vector<double> v = download(t).to_vector<double>();
  for (double& x : v) x = std::fabs(x);
  return v;
}

// The gated flash forward against the plain one of the same kernels (o, lse), and the gated
// backward against the CPU twin. The forward: lse and (with w) the kept o bitwise the plain
// call's; out within two bf16 roundings of o times the gate (out's and the plain o's, each at
// most 2^-8 of the value: 2^-7 (1 + 2^-8) of |o gate|). The pre-pass (launched alone on
// the GPU's outputs) against cpu::attention_gate_prepass on the same values: dout and the
// per-element dz within one bf16 rounding, delta, the per-row dz and dw within fp32 sums of
// their terms' magnitudes plus a rounding. The backward's dq, dk, dv against the CPU backward
// given the GPU pre-pass's dout and delta (the sigmoid gate alone: o is not kept) or dout and
// o (with w), within the rounding bounds of the plain check; its dz, dw bitwise the pre-pass's.
void check_gated_case(const Case& c, const GateForm& form, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "gate " << form.name << ", B " << c.B << " T " << c.T << " H " << c.H
                                    << " Hkv " << c.Hkv << " D " << c.D << " s2 " << c.s2);
  const DType bf = DType::bf16;
  const Shape q_shape{c.B, c.T, c.H, c.D}, kv_shape{c.B, c.S, c.Hkv, c.D}, row_shape{c.B, c.H, c.T};
  const Shape gate_rows{c.B, c.T, c.H};
  Tensor q = random_rounded(q_shape, seed, bf, 1.5), k = random_rounded(kv_shape, seed + 1, bf, 1.5);
  Tensor v = random_rounded(kv_shape, seed + 2, bf), dy = random_rounded(q_shape, seed + 3, bf);
  Tensor dlse = testing::random_tensor(row_shape, seed + 4, DType::f32, 0.5);
  cpu::OutputGate g_host, g;  // f32 on the host, bf16 on the GPU
  if (form.z) g_host.z = random_rounded(form.z_per_row ? gate_rows : q_shape, seed + 5, bf, 2.0);
  if (form.w) {  // MoH's weights: every third row's exactly 0
    std::vector<float> w = random_rounded(gate_rows, seed + 6, bf).to_vector<float>();
    for (size_t i = 0; i < w.size(); i += 3) w[i] = 0.f;
    g_host.w = Tensor::from_vector(w, gate_rows);
  }
  if (form.z) g.z = g_host.z.to(bf).to(gpu());
  if (form.w) g.w = g_host.w.to(bf).to(gpu());
  Tensor qp, kp;
  make_positions(c.positions, c.T, c.S, seed + 7, qp, kp);
  const S2Pattern s2 = c.s2 ? S2Pattern{64, 2, 4} : S2Pattern{};
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  Tensor qg = q.to(bf).to(gpu()), kg = k.to(bf).to(gpu()), vg = v.to(bf).to(gpu()), qpg = qp.to(gpu()),
         kpg = kp.to(gpu());
  const cuda::AttentionKernel flash = cuda::AttentionKernel::flash;

  // Forward: plain and gated.
  Tensor o = poisoned(q_shape, bf), lse_plain = poisoned(row_shape, DType::f32);
  cuda::attention_forward(o, lse_plain, qg, kg, vg, qpg, kpg, scale, c.causal, s2, gpu_stream(), flash);
  Tensor y = poisoned(q_shape, bf), lse = poisoned(row_shape, DType::f32), ungated;
  cuda::attention_forward_gated(y, ungated, lse, qg, kg, vg, g, qpg, kpg, scale, c.causal, s2, gpu_stream(), flash);
  EXPECT_TRUE(testing::tensors_close(download(lse), download(lse_plain), 0, 0)) << "lse";
  ASSERT_EQ(ungated.defined(), form.w) << "o is kept exactly when the gate has w";
  if (form.w) {
    EXPECT_TRUE(testing::tensors_close(download(ungated), download(o), 0, 0)) << "ungated";
  }
  Tensor o_host = o.to(Device::cpu()).to(DType::f32), y_host = y.to(Device::cpu()).to(DType::f32);
  {
    // The CPU gate on the GPU's o (the forward twin's second half): out = o * gate.
    std::vector<double> ov = o_host.to_vector<double>(), ev(ov.size());
    const std::vector<double> zv = form.z ? g_host.z.to_vector<double>() : std::vector<double>{};
    const std::vector<double> wv = form.w ? g_host.w.to_vector<double>() : std::vector<double>{};
    for (size_t e = 0; e < ov.size(); ++e) {
      const size_t r = e / static_cast<size_t>(c.D);
      double gate = form.w ? wv[r] : 1.0;
      if (form.z) gate /= 1.0 + std::exp(-zv[form.z_per_row ? r : e]);
      ev[e] = ov[e] * gate;
    }
    std::vector<double> mag(ev.size());
    for (size_t e = 0; e < ev.size(); ++e) mag[e] = std::fabs(ev[e]);
    EXPECT_TRUE(within(download(y).to_vector<double>(), ev, mag, std::ldexp(1.0, -7) * (1 + std::ldexp(1.0, -8)), "out"));
  }

  // The pre-pass alone on the GPU, and its CPU twin on the same values.
  cuda::detail::AttentionGate raw;
  raw.z = form.z ? g.z.raw_data() : nullptr;
  raw.w = form.w ? g.w.raw_data() : nullptr;
  raw.ungated = form.w ? ungated.raw_data() : nullptr;
  raw.z_per_row = form.z_per_row;
  const cuda::detail::AttentionDims n{c.B, c.T, c.S, c.H, c.Hkv, c.D};
  Tensor dyg = dy.to(bf).to(gpu()), dlseg = dlse.to(gpu());
  Tensor dout = poisoned(q_shape, bf), delta = poisoned(row_shape, DType::f32);
  Tensor dz_pre = form.z ? poisoned(g.z.shape(), bf) : Tensor(), dw_pre = form.w ? poisoned(gate_rows, bf) : Tensor();
  cuda::detail::launch_attention_gate_prepass(bf, dout.raw_data(), form.z ? dz_pre.raw_data() : nullptr,
                                              form.w ? dw_pre.raw_data() : nullptr, delta.data<float>(),
                                              dyg.raw_data(), y.raw_data(), dlseg.data<float>(), raw, n,
                                              static_cast<cudaStream_t>(gpu_stream().handle()));
  Tensor dout_ref = Tensor::empty(q_shape), delta_ref = Tensor::empty(row_shape);
  Tensor dz_ref = form.z ? Tensor::empty(g_host.z.shape()) : Tensor(), dw_ref = form.w ? Tensor::empty(gate_rows) : Tensor();
  cpu::attention_gate_prepass(dout_ref, dz_ref, dw_ref, delta_ref, dy, y_host, o_host, dlse, g_host);
  const double u = std::ldexp(1.0, -8), sums = static_cast<double>(c.D) * std::ldexp(1.0, -23);
  EXPECT_TRUE(within(download(dout).to_vector<double>(), dout_ref.to_vector<double>(), magnitudes(dout_ref), u, "dout"));
  // Row magnitudes: sum over the row of |dy y| and |dy o|, per (b, h, i) and per (b, i, h).
  const std::vector<double> dyv = dy.to_vector<double>(), yv = y_host.to_vector<double>(), ov = o_host.to_vector<double>();
  std::vector<double> dyy_row(static_cast<size_t>(c.B * c.T * c.H)), dyo_row(dyy_row.size()), delta_mag(dyy_row.size());
  for (size_t r = 0; r < dyy_row.size(); ++r) {
    for (int64_t d = 0; d < c.D; ++d) {
      const size_t e = r * static_cast<size_t>(c.D) + static_cast<size_t>(d);
      dyy_row[r] += std::fabs(dyv[e] * yv[e]);
      dyo_row[r] += std::fabs(dyv[e] * ov[e]);
    }
    const int64_t ri = static_cast<int64_t>(r), h = ri % c.H, i = (ri / c.H) % c.T, b = ri / (c.H * c.T);
    delta_mag[static_cast<size_t>((b * c.H + h) * c.T + i)] = dyy_row[r];
  }
  EXPECT_TRUE(within(download(delta).to_vector<double>(), delta_ref.to_vector<double>(), delta_mag, sums, "delta"));
  if (form.z) {
    std::vector<double> dz_mag = form.z_per_row ? dyy_row : magnitudes(dz_ref);
    for (size_t e = 0; e < dz_mag.size(); ++e) dz_mag[e] = form.z_per_row ? dz_mag[e] * (sums + u) : dz_mag[e] * u;
    EXPECT_TRUE(within(download(dz_pre).to_vector<double>(), dz_ref.to_vector<double>(), dz_mag, 1.0, "dz"));
  }
  if (form.w) {
    EXPECT_TRUE(within(download(dw_pre).to_vector<double>(), dw_ref.to_vector<double>(), dyo_row, sums + u, "dw"));
  }

  // The whole gated backward, both flash backwards.
  Tensor dout_host = dout.to(Device::cpu()).to(DType::f32), delta_host = delta.to(Device::cpu());
  Tensor lse_host = lse.to(Device::cpu());
  Tensor dq_ref = Tensor::empty(q_shape), dk_ref = Tensor::empty(kv_shape), dv_ref = Tensor::empty(kv_shape);
  if (form.w)  // o kept: the plain backward on dout and o
    cpu::attention_backward(dq_ref, dk_ref, dv_ref, dout_host, dlse, q, k, v, o_host, lse_host, qp, kp, scale,
                            c.causal, s2, cpu_stream());
  else  // y alone: the pre-pass's delta (dlse in it)
    cpu::attention_backward(dq_ref, dk_ref, dv_ref, dout_host, Tensor(), q, k, v, y_host, lse_host, qp, kp, scale,
                            c.causal, s2, cpu_stream(), delta_host);
  const RoundingBounds bound = rounding_bounds(c, q, k, v, dout_host, dlse, o, lse_host, qp, kp, s2, scale, false);
  for (bool deterministic : {false, true}) {
    SCOPED_TRACE(deterministic ? "deterministic backward" : "fused backward");
    const DeterministicScope scope(deterministic);
    Tensor dq = poisoned(q_shape, bf), dk = poisoned(kv_shape, bf), dv = poisoned(kv_shape, bf);
    Tensor dz = form.z ? poisoned(g.z.shape(), bf) : Tensor(), dw = form.w ? poisoned(gate_rows, bf) : Tensor();
    cuda::attention_backward_gated(dq, dk, dv, dz, dw, dyg, dlseg, qg, kg, vg, y, ungated, lse, g, qpg, kpg, scale,
                                   c.causal, s2, gpu_stream(), flash);
    EXPECT_TRUE(within_rounding(dq, dq_ref, bound.dq, bound.dq_abs)) << "dq";
    EXPECT_TRUE(within_rounding(dk, dk_ref, bound.dk, bound.dk_abs)) << "dk";
    EXPECT_TRUE(within_rounding(dv, dv_ref, bound.dv, bound.dv_abs)) << "dv";
    if (form.z) {
      EXPECT_TRUE(testing::tensors_close(download(dz), download(dz_pre), 0, 0)) << "dz";
    }
    if (form.w) {
      EXPECT_TRUE(testing::tensors_close(download(dw), download(dw_pre), 0, 0)) << "dw";
    }
  }
}

TEST(CudaFlashAttention, GatedOutputMatchesTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  for (bool wgmma : flash_families()) {
    SCOPED_TRACE(wgmma ? "wgmma kernels" : "mma.sync kernels");
    const FlashFamily family(wgmma);
    uint64_t seed = 12000;
    int form = 0;
    for (int64_t T : {1, 17, 1000})
      for (int64_t D : {64, 128})
        for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 1}}) {
          check_gated_case(Case{1, T, T, H, Hkv, D, true, form % 2 == 1}, kGateForms[form % 5], seed);
          ++form;
          seed += 10;
        }
    check_gated_case(Case{1, 4097, 4097, 2, 1, 128, true, false}, kGateForms[3], seed);
    check_gated_case(Case{2, 1000, 1000, 4, 2, 64, true, true, Positions::zigzag}, kGateForms[4], seed + 10);
  }
}

// The paths without the fused epilogue (cuDNN, the f32 interim kernels) run the plain forward into
// o and the gate after it, and keep o: the same gate math, checked against the CPU twin.
TEST(CudaFlashAttention, GatedOutputOffTheFlashKernelsKeepsO) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t B = 1, T = 300, H = 4, Hkv = 2, D = 64;
  const Shape q_shape{B, T, H, D}, kv_shape{B, T, Hkv, D}, rows{B, T, H};
  for (const GateForm& form : kGateForms) {
    SCOPED_TRACE(form.name);
    Tensor q = testing::random_tensor(q_shape, 1, DType::f32), k = testing::random_tensor(kv_shape, 2, DType::f32);
    Tensor v = testing::random_tensor(kv_shape, 3, DType::f32), dy = testing::random_tensor(q_shape, 4, DType::f32);
    cpu::OutputGate g_host, g;
    if (form.z) g_host.z = testing::random_tensor(form.z_per_row ? rows : q_shape, 5, DType::f32, 2.0);
    if (form.w) g_host.w = testing::random_tensor(rows, 6, DType::f32);
    if (form.z) g.z = g_host.z.to(gpu());
    if (form.w) g.w = g_host.w.to(gpu());
    Tensor pos = Tensor::arange(T);
    const double scale = 0.125;
    Tensor y_ref = Tensor::empty(q_shape), lse_ref = Tensor::empty({B, H, T}), o_ref;
    cpu::attention_forward_gated(y_ref, o_ref, lse_ref, q, k, v, g_host, pos, pos, scale, true, S2Pattern{},
                                 cpu_stream());
    Tensor dq_ref = Tensor::empty(q_shape), dk_ref = Tensor::empty(kv_shape), dv_ref = Tensor::empty(kv_shape);
    Tensor dz_ref = form.z ? Tensor::empty(g_host.z.shape()) : Tensor(), dw_ref = form.w ? Tensor::empty(rows) : Tensor();
    cpu::attention_backward_gated(dq_ref, dk_ref, dv_ref, dz_ref, dw_ref, dy, Tensor(), q, k, v, y_ref, o_ref, lse_ref,
                                  g_host, pos, pos, scale, true, S2Pattern{}, cpu_stream());
    Tensor qg = q.to(gpu()), kg = k.to(gpu()), vg = v.to(gpu()), pg = pos.to(gpu()), dyg = dy.to(gpu());
    Tensor y = poisoned(q_shape, DType::f32), lse = poisoned({B, H, T}, DType::f32), o;
    cuda::attention_forward_gated(y, o, lse, qg, kg, vg, g, pg, pg, scale, true, S2Pattern{}, gpu_stream(),
                                  cuda::AttentionKernel::interim);
    ASSERT_TRUE(o.defined()) << "the interim kernels keep o";
    EXPECT_TRUE(close_to_reference(y, y_ref, DType::f32, 1e-4, 1e-5)) << "out";
    Tensor dq = poisoned(q_shape, DType::f32), dk = poisoned(kv_shape, DType::f32), dv = poisoned(kv_shape, DType::f32);
    Tensor dz = form.z ? poisoned(g.z.shape(), DType::f32) : Tensor(), dw = form.w ? poisoned(rows, DType::f32) : Tensor();
    cuda::attention_backward_gated(dq, dk, dv, dz, dw, dyg, Tensor(), qg, kg, vg, y, o, lse, g, pg, pg, scale, true,
                                   S2Pattern{}, gpu_stream(), cuda::AttentionKernel::interim);
    EXPECT_TRUE(close_to_reference(dq, dq_ref, DType::f32, 1e-4, 1e-5)) << "dq";
    EXPECT_TRUE(close_to_reference(dk, dk_ref, DType::f32, 1e-4, 1e-5)) << "dk";
    EXPECT_TRUE(close_to_reference(dv, dv_ref, DType::f32, 1e-4, 1e-5)) << "dv";
    if (form.z) {
      EXPECT_TRUE(close_to_reference(dz, dz_ref, DType::f32, 1e-4, 1e-5)) << "dz";
    }
    if (form.w) {
      EXPECT_TRUE(close_to_reference(dw, dw_ref, DType::f32, 1e-4, 1e-5)) << "dw";
    }
  }
}

// The dK dV blocks' key tiles and their S2 launch order (key_blocks.h) are plain arithmetic: checked
// here on the host, so without a GPU too.
TEST(FlashKeyBlocks, EveryKeyTileIsTakenOnce) {
  using cuda::detail::flash::key_tiles_of;
  for (int64_t S : {1, 64, 65, 1000, 1100, 4097, 9536, 32768})
    for (int keys : {64, 128})
      for (int64_t pair : {1, 2, 4, 8})
        for (int64_t strided = -1; strided < pair; ++strided) {  // -1: every chunk block pairs i, i + pair
          SCOPED_TRACE("S " + std::to_string(S) + " keys " + std::to_string(keys) + " pair " + std::to_string(pair) +
                       " strided " + std::to_string(strided));
          const int64_t tiles = (S + 63) / 64, blocks = (S + keys - 1) / keys, whole = S / 64 / (2 * pair);
          std::vector<int> taken(static_cast<size_t>(tiles), 0);
          for (int64_t b = 0; b < blocks; ++b) {
            const auto kt = key_tiles_of(b, keys, S, pair, strided);
            for (int h = 0; h < keys / 64; ++h) {
              const int64_t t = kt.t0 + h * kt.step;
              ASSERT_GE(t, 0) << "block " << b;
              if (t < tiles) ++taken[static_cast<size_t>(t)];
            }
            // Paired chunks (keys 128, pair > 1): the strided block takes the chunk's two strided tiles,
            // every other block two local tiles at most 3 apart.
            if (keys != 128 || pair == 1 || strided < 0 || b >= whole * pair) continue;
            const bool on_shard = kt.t0 % pair == strided, second_on_shard = (kt.t0 + kt.step) % pair == strided;
            EXPECT_EQ(on_shard, b % pair == strided) << "block " << b;
            EXPECT_EQ(second_on_shard, on_shard) << "block " << b;
            if (!on_shard) {
              EXPECT_LE(kt.step, 3) << "block " << b;
            }
          }
          for (int64_t t = 0; t < tiles; ++t) EXPECT_EQ(taken[static_cast<size_t>(t)], 1) << "tile " << t;
        }
}

// The masks' divisions (div_pos, mod_pos) take a 32-bit path where both operands fit: the same
// quotients and remainders as C++'s 64-bit ones on both sides of that bound, negatives included.
TEST(FlashKeyBlocks, PositionDivisionsMatchCpp) {
  using cuda::detail::div_pos;
  using cuda::detail::mod_pos;
  const int64_t big = int64_t{1} << 32;
  const int64_t as[] = {0, 1, 63, 64, 65, 131071, 131072, big - 1, big, big + 1, 3 * big + 7,
                        std::numeric_limits<int64_t>::max(), -1, -64, -65, -big, std::numeric_limits<int64_t>::min() + 1};
  const int64_t bs[] = {1, 3, 8, 64, 100, big - 1, big, big + 5, -1, -8};
  for (int64_t a : as)
    for (int64_t b : bs) {
      EXPECT_EQ(div_pos(a, b), a / b) << a << " / " << b;
      EXPECT_EQ(mod_pos(a, b), a % b) << a << " % " << b;
    }
}

TEST(FlashKeyBlocks, S2OrderIsAPermutationWithEachHeadsStridedPairsFirstInGroups) {
  using cuda::detail::flash::kS2Group;
  using cuda::detail::flash::key_tiles_of;
  using cuda::detail::flash::s2_block_order;
  for (int64_t S : {1000, 1100, 3072, 4097, 9536, 32768, 131072})
    for (int64_t pair : {2, 4, 8})
      for (int64_t heads : {1, 3, 16})
        for (int64_t offset : {0, 1, 3, 5}) {
          SCOPED_TRACE("S " + std::to_string(S) + " pair " + std::to_string(pair) + " heads " +
                       std::to_string(heads) + " offset " + std::to_string(offset));
          const int64_t blocks = (S + 127) / 128, whole = S / 64 / (2 * pair);
          std::vector<char> seen(static_cast<size_t>(blocks * heads), 0);
          std::vector<int64_t> last_chunk(static_cast<size_t>(heads), -1);
          const int64_t full_groups = heads * kS2Group * (whole / kS2Group);  // slots in whole groups
          int64_t window_head = -1, window_chunk = -1;
          for (int64_t lin = 0; lin < blocks * heads; ++lin) {
            const auto slot = s2_block_order(lin, blocks, heads, S, pair, offset);
            ASSERT_TRUE(slot.block >= 0 && slot.block < blocks && slot.head >= 0 && slot.head < heads)
                << "slot " << lin << " -> block " << slot.block << " head " << slot.head;
            char& once = seen[static_cast<size_t>(slot.head * blocks + slot.block)];
            ASSERT_EQ(once, 0) << "block " << slot.block << " of head " << slot.head << " launched twice";
            once = 1;
            const auto kt = key_tiles_of(slot.block, 128, S, pair,
                                         cuda::detail::flash::s2_strided_index(slot.head, offset, pair));
            const bool strided = kt.step == pair && (kt.t0 + slot.head * offset) % pair == 0;
            // Every head's strided pairs take the first heads * whole slots, none after them.
            EXPECT_EQ(strided, lin < heads * whole) << "slot " << lin << " -> tile " << kt.t0 << " head " << slot.head;
            if (!strided) continue;
            // A head's strided pairs go low chunks first; within whole groups, each aligned window of
            // kS2Group slots is one head's consecutive chunks.
            const int64_t chunk = kt.t0 / (2 * pair);
            EXPECT_GT(chunk, last_chunk[static_cast<size_t>(slot.head)]) << "slot " << lin << ": head " << slot.head;
            last_chunk[static_cast<size_t>(slot.head)] = chunk;
            if (lin < full_groups) {
              if (lin % kS2Group != 0) {
                EXPECT_EQ(slot.head, window_head) << "slot " << lin << " leaves its group's head";
                EXPECT_EQ(chunk, window_chunk + 1) << "slot " << lin;
              }
              window_head = slot.head;
              window_chunk = chunk;
            }
          }
        }
}

// The warpgroup backward's fp32 dQ tile order: every (warp, column block, lane) fragment's four
// floats land on distinct slots of the 64 x 64 tile, at the cells of the m16n8 accumulator layout,
// and dq_tile_cell (the store kernel's way back) inverts dq_tile_index.
TEST(FlashKeyBlocks, DqTileOrderIsAPermutationOfTheAccumulatorCells) {
  using cuda::detail::flash::dq_tile_cell;
  using cuda::detail::flash::dq_tile_index;
  using cuda::detail::flash::kDqTileElems;
  std::vector<char> slot(kDqTileElems, 0), cell(kDqTileElems, 0);
  for (int w = 0; w < 4; ++w)
    for (int nt = 0; nt < 8; ++nt)
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 4; ++j) {
          const int i = dq_tile_index(w, nt, lane) + j;
          ASSERT_TRUE(i >= 0 && i < kDqTileElems) << "w " << w << " nt " << nt << " lane " << lane;
          ASSERT_EQ(slot[static_cast<size_t>(i)], 0) << "slot " << i << " taken twice";
          slot[static_cast<size_t>(i)] = 1;
          const auto c = dq_tile_cell(i);
          EXPECT_EQ(c.row, 16 * w + lane / 4 + 8 * (j / 2)) << "slot " << i;
          EXPECT_EQ(c.col, 8 * nt + 2 * (lane % 4) + j % 2) << "slot " << i;
          ASSERT_TRUE(c.row >= 0 && c.row < 64 && c.col >= 0 && c.col < 64) << "slot " << i;
          char& once = cell[static_cast<size_t>(64 * c.row + c.col)];
          EXPECT_EQ(once, 0) << "cell " << c.row << ", " << c.col << " twice";
          once = 1;
        }
  // A fragment's first float is 16-byte aligned (the kernel stores float4s) and a warp's 32 lanes
  // are contiguous.
  for (int w = 0; w < 4; ++w)
    for (int nt = 0; nt < 8; ++nt) {
      EXPECT_EQ(dq_tile_index(w, nt, 0) % 4, 0);
      EXPECT_EQ(dq_tile_index(w, nt, 31) - dq_tile_index(w, nt, 0), 4 * 31);
    }
}

TEST(CudaFlashAttention, BackwardIsDeterministic) {
  LOOM_SKIP_WITHOUT_GPU();
  const Shape q_shape{1, 300, 4, 128}, kv_shape{1, 300, 1, 128};
  const DType bf = DType::bf16;
  Tensor q = testing::random_tensor(q_shape, 7, DType::f32).to(bf).to(gpu());
  Tensor k = testing::random_tensor(kv_shape, 8, DType::f32).to(bf).to(gpu());
  Tensor v = testing::random_tensor(kv_shape, 9, DType::f32).to(bf).to(gpu());
  Tensor dout = testing::random_tensor(q_shape, 10, DType::f32).to(bf).to(gpu());
  Tensor pos = Tensor::arange(300).to(gpu());
  Tensor out = poisoned(q_shape, bf), lse = poisoned({1, 4, 300}, DType::f32);
  cuda::attention_forward(out, lse, q, k, v, pos, pos, 0.09, true, S2Pattern{}, gpu_stream(),
                          cuda::AttentionKernel::flash);
  // Deterministic: every gradient bitwise equal across runs. Fused: dK and dV still are (each is summed
  // in one block's registers in a fixed order); dQ's atomic additions may come in another order.
  for (bool deterministic : {true, false}) {
    SCOPED_TRACE(deterministic ? "deterministic backward" : "fused backward");
    const DeterministicScope scope(deterministic);
    Tensor dq[2], dk[2], dv[2];
    for (int run = 0; run < 2; ++run) {
      dq[run] = poisoned(q_shape, bf), dk[run] = poisoned(kv_shape, bf), dv[run] = poisoned(kv_shape, bf);
      cuda::attention_backward(dq[run], dk[run], dv[run], dout, Tensor(), q, k, v, out, lse, pos, pos, 0.09, true,
                               S2Pattern{}, gpu_stream(), cuda::AttentionKernel::flash);
    }
    if (deterministic) {
      EXPECT_TENSOR_CLOSE(download(dq[1]), download(dq[0]), 0, 0);
    }
    EXPECT_TENSOR_CLOSE(download(dk[1]), download(dk[0]), 0, 0);
    EXPECT_TENSOR_CLOSE(download(dv[1]), download(dv[0]), 0, 0);
  }
}

TEST(CudaFlashAttention, DispatchRunsTheKernelsTheBackendNames) {
  LOOM_SKIP_WITHOUT_GPU();
  const Shape q_shape{1, 200, 2, 64};
  const DType bf = DType::bf16;
  Tensor q = testing::random_tensor(q_shape, 11, DType::f32).to(bf).to(gpu());
  Tensor pos = Tensor::arange(200).to(gpu());
  auto run = [&](cuda::AttentionKernel kernel) {
    Tensor out = poisoned(q_shape, bf), lse = poisoned({1, 2, 200}, DType::f32);
    cuda::attention_forward(out, lse, q, q, q, pos, pos, 0.125, true, S2Pattern{}, gpu_stream(), kernel);
    return download(out);
  };
  auto via_dispatch = [&](dispatch::AttentionBackend backend) {
    dispatch::set_attention_backend(backend);
    Tensor out = poisoned(q_shape, bf), lse = poisoned({1, 2, 200}, DType::f32);
    dispatch::attention_forward(out, lse, q, q, q, pos, pos, 0.125, true, S2Pattern{}, gpu_stream());
    dispatch::set_attention_backend(dispatch::AttentionBackend::automatic);
    return download(out);
  };
  const Tensor flash = run(cuda::AttentionKernel::flash), interim = run(cuda::AttentionKernel::interim);
  EXPECT_TENSOR_CLOSE(via_dispatch(dispatch::AttentionBackend::native), flash, 0, 0);
  EXPECT_TENSOR_CLOSE(via_dispatch(dispatch::AttentionBackend::interim), interim, 0, 0);
  EXPECT_TENSOR_CLOSE(via_dispatch(dispatch::AttentionBackend::automatic), flash, 0, 0);
  // The two kernels differ (P is rounded to bf16 in the flash path): the comparisons above can tell them apart.
  const std::vector<double> fv = flash.to_vector<double>(), iv = interim.to_vector<double>();
  double differ = 0;
  for (size_t e = 0; e < fv.size(); ++e) differ = std::max(differ, std::fabs(fv[e] - iv[e]));
  EXPECT_GT(differ, 0.0);
  // Where flash does not apply (f32, D = 40), native runs the interim kernels.
  Tensor q32 = testing::random_tensor({1, 50, 2, 40}, 12, DType::f32).to(gpu());
  EXPECT_FALSE(cuda::flash_attention_applies(q32, q32, q32));
  Tensor a = poisoned({1, 50, 2, 40}, DType::f32), la = poisoned({1, 2, 50}, DType::f32);
  Tensor b = poisoned({1, 50, 2, 40}, DType::f32), lb = poisoned({1, 2, 50}, DType::f32);
  Tensor p50 = Tensor::arange(50).to(gpu());
  cuda::attention_forward(a, la, q32, q32, q32, p50, p50, 0.2, true, S2Pattern{}, gpu_stream(),
                          cuda::AttentionKernel::flash);
  cuda::attention_forward(b, lb, q32, q32, q32, p50, p50, 0.2, true, S2Pattern{}, gpu_stream(),
                          cuda::AttentionKernel::interim);
  EXPECT_TENSOR_CLOSE(download(a), download(b), 0, 0);
}

// ---- cuDNN (kernels/cuda/cudnn_attention.h) ----

TEST(CudaCudnnAttention, MatchesTheCpuTwinOnTheCallsItTakes) {
  LOOM_SKIP_WITHOUT_GPU();
  ASSERT_TRUE(cuda::cudnn_attention_available()) << cuda::cudnn_attention_version();
  std::printf("cuDNN %s\n", cuda::cudnn_attention_version().c_str());
  uint64_t seed = 11000;
  // Forward and backward (lengths multiples of 128): causal, full, queries after
  // their keys (the bottom-right diagonal of a ring step), GQA 1 and 4, B 2.
  const Case both[] = {
      {1, 128, 128, 2, 2, 64, true, false},
      {2, 256, 256, 4, 1, 128, true, false},
      {1, 1024, 1024, 4, 4, 128, false, false},
      {1, 128, 384, 4, 2, 64, false, false},
      {1, 256, 768, 2, 1, 128, true, false, Positions::query_suffix},
      {1, 2048, 2048, 2, 1, 64, true, false},
      {1, 4096, 4096, 2, 2, 128, true, false},
  };
  for (const Case& c : both) {
    check_case(c, seed, Engine::cudnn);
    seed += 10;
  }
  // Forward only at awkward lengths (cuDNN's backward gets only multiples of 128 from loom).
  const Case forward_only[] = {{1, 17, 17, 2, 2, 64, true, false},
                               {1, 1000, 1000, 4, 1, 128, true, false},
                               {2, 100, 300, 2, 2, 128, false, false},
                               {1, 65, 1000, 2, 2, 64, true, false, Positions::query_suffix}};
  for (const Case& c : forward_only) {
    check_case(c, seed, Engine::cudnn_forward);
    seed += 10;
  }
}

TEST(CudaCudnnAttention, BackendsRouteByMaskFormAndOperands) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t T = 256;
  const Shape q_shape{1, T, 2, 64}, row_shape{1, 2, T};
  const DType bf = DType::bf16;
  Tensor q = testing::random_tensor(q_shape, 21, DType::f32).to(bf).to(gpu());
  Tensor k = testing::random_tensor(q_shape, 22, DType::f32).to(bf).to(gpu());
  Tensor v = testing::random_tensor(q_shape, 23, DType::f32).to(bf).to(gpu());
  Tensor pos = Tensor::arange(T).to(gpu());
  auto direct = [&](bool use_cudnn) {
    Tensor out = poisoned(q_shape, bf), lse = poisoned(row_shape, DType::f32);
    if (use_cudnn) {
      EXPECT_TRUE(cuda::cudnn_attention_forward(out, lse, q, k, v, 0, 0.125, gpu_stream()));
    } else {
      cuda::attention_forward(out, lse, q, k, v, pos, pos, 0.125, true, S2Pattern{}, gpu_stream(),
                              cuda::AttentionKernel::flash);
    }
    return download(out);
  };
  auto via = [&](dispatch::AttentionBackend backend, cpu::MaskForm form) {
    dispatch::set_attention_backend(backend);
    Tensor out = poisoned(q_shape, bf), lse = poisoned(row_shape, DType::f32);
    dispatch::attention_forward(out, lse, q, k, v, pos, pos, 0.125, true, S2Pattern{}, gpu_stream(), form);
    dispatch::set_attention_backend(dispatch::AttentionBackend::automatic);
    return download(out);
  };
  const Tensor by_cudnn = direct(true), by_flash = direct(false);
  // cuDNN and flash round differently, so the exact comparisons below tell them apart.
  const std::vector<double> a = by_cudnn.to_vector<double>(), b = by_flash.to_vector<double>();
  double differ = 0;
  for (size_t e = 0; e < a.size(); ++e) differ = std::max(differ, std::fabs(a[e] - b[e]));
  ASSERT_GT(differ, 0.0);
  EXPECT_TENSOR_CLOSE(via(dispatch::AttentionBackend::cudnn, cpu::MaskForm::diagonal(0)), by_cudnn, 0, 0);
  EXPECT_TENSOR_CLOSE(via(dispatch::AttentionBackend::native, cpu::MaskForm::diagonal(0)), by_flash, 0, 0);
  // Positions cuDNN's mask cannot express stay on flash, whatever the backend.
  EXPECT_TENSOR_CLOSE(via(dispatch::AttentionBackend::cudnn, cpu::MaskForm::positions()), by_flash, 0, 0);
  // best (the timed choice auto is to take) runs one of the two, the same one on every later call of the shape.
  auto best = [&] {
    Tensor out = poisoned(q_shape, bf), lse = poisoned(row_shape, DType::f32);
    cuda::attention_forward(out, lse, q, k, v, pos, pos, 0.125, true, S2Pattern{}, gpu_stream(),
                            cuda::AttentionKernel::best, cpu::MaskForm::diagonal(0));
    return download(out);
  };
  const Tensor first = best(), again = best();
  EXPECT_TENSOR_CLOSE(again, first, 0, 0);
  const std::vector<double> f = first.to_vector<double>();
  EXPECT_TRUE(f == a || f == b) << "auto ran neither cuDNN nor flash";
}

}  // namespace
}  // namespace loom
