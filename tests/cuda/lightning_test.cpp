// CUDA lightning attention kernels against the recurrent CPU twin
// (kernels/cpu/lightning.h, block_size 0) in f32 on the same inputs (bf16 cases
// round the inputs first): T = 1, 63, 64, 65, 300 (around and across the
// 64-token chunk), D = 16, 64, 128 and an odd 40, no decay and strong decay
// (per head), non-zero initial state and dS_final, outputs poisoned with NaN;
// long T (1100, 4097, 20000) that the kernels split into segments.
// Every backward runs twice: recomputing the forward-order states and reusing
// the ones the forward saved. Also: two calls chained through the state equal one call (outputs, final
// state, and all gradients with dS flowing back between the calls), T = 0, and
// named argument errors.
// Tolerance, f32 storage: the GPU sums in fp32 in another order (chunked vs
// token by token): an absolute slack of 2e-5 of the largest reference
// magnitude plus 1e-4 relative. bf16 storage: the tensor-core kernel rounds
// the operands it forms in fp32 (the masked, decayed A; the state; the
// decay-weighted z of the update) to bf16 once per use (lightning_mma.cuh), so
// an output's error is a sum of independent roundings of its terms, each up to
// 2^-9 of the term: about 2^-9 sqrt(sum of squared terms) per rounding. Every
// term of every output is a product of input elements, decay powers and
// out_scale, so sqrt(sum of squared terms) is the CPU twin run on the squared
// inputs with doubled decays and out_scale^2. The bound per element is
// 2^-8 |ref| (the output's own bf16 rounding) + 2^-5 of that root sum of
// squares (8x one rounding; a host simulation of the kernel's roundings gave
// at most 2^-6.2 over T up to 4097, D 40-128, decays 0-2) + the fp32 slack.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "kernels/cpu/lightning.h"
#include "kernels/cuda/lightning.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using cuda_testing::cpu_stream;
using cuda_testing::expect_error;
using cuda_testing::gpu;
using cuda_testing::gpu_stream;
using cuda_testing::poisoned;
using cuda_testing::random_rounded;

double max_abs(const Tensor& t) {
  double m = 0;
  for (double v : t.to_vector<double>()) m = std::max(m, std::fabs(v));
  return m;
}

::testing::AssertionResult close(const Tensor& gpu_tensor, const Tensor& expected, DType dtype) {
  const double rtol = dtype == DType::bf16 ? std::ldexp(1.0, -8) : 1e-4;
  return testing::tensors_close(gpu_tensor.to(Device::cpu()).to(DType::f32), expected, rtol,
                                2e-5 * std::max(1.0, max_abs(expected)));
}

// The largest |gpu - ref| / bound seen by close_to_rounded_terms since the last report (how much of the
// bound the bf16 kernel uses; printed by report_bound_use).
double g_bound_use = 0;

void report_bound_use(const char* test) {
  std::printf("%s: bf16 worst |error| / bound = %.3f\n", test, g_bound_use);
  g_bound_use = 0;
}

// The bf16 kernel's bound (see the top): |gpu - ref| <= rtol |ref| + 2^-5 sqrt(squares) + 2e-5 max |ref|,
// where `squares` is the CPU twin's result on the squared inputs.
::testing::AssertionResult close_to_rounded_terms(const Tensor& gpu_tensor, const Tensor& expected,
                                                  const Tensor& squares, double rtol) {
  const std::vector<double> a = gpu_tensor.to(Device::cpu()).to(DType::f32).to_vector<double>();
  const std::vector<double> e = expected.to_vector<double>();
  const std::vector<double> sq = squares.to_vector<double>();
  const double floor = 2e-5 * std::max(1.0, max_abs(expected));
  int64_t failures = 0, worst = -1;
  double worst_ratio = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double allowed = rtol * std::fabs(e[i]) + std::ldexp(std::sqrt(std::max(sq[i], 0.0)), -5) + floor;
    const double diff = std::fabs(a[i] - e[i]);
    const double ratio = std::isnan(diff) ? INFINITY : diff / allowed;
    g_bound_use = std::max(g_bound_use, ratio);
    if (!(diff <= allowed)) {
      ++failures;
      if (worst < 0 || ratio > worst_ratio) worst = static_cast<int64_t>(i), worst_ratio = ratio;
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << failures << " of " << a.size() << " elements outside the bound; worst at "
                                       << worst << ": gpu " << a[worst] << ", expected " << e[worst]
                                       << ", root sum of squared terms " << std::sqrt(sq[worst]) << " ("
                                       << worst_ratio << "x the bound)";
}

Tensor squared(const Tensor& t) {
  std::vector<double> v = t.to_vector<double>();
  for (double& x : v) x *= x;
  return Tensor::from_vector<double>(v, t.shape()).to(DType::f32);
}

struct Inputs {
  Tensor q, k, v, dout, s0, dsf, lambdas;
};

Inputs make_inputs(int64_t B, int64_t T, int64_t H, int64_t D, const std::vector<double>& lambdas, DType dtype,
                   uint64_t seed) {
  const Shape shape{B, T, H, D}, state{B, H, D, D};
  Inputs in;
  in.q = random_rounded(shape, seed, dtype);
  in.k = random_rounded(shape, seed + 1, dtype);
  in.v = random_rounded(shape, seed + 2, dtype);
  in.dout = random_rounded(shape, seed + 3, dtype);
  in.s0 = testing::random_tensor(state, seed + 4, DType::f32);
  in.dsf = testing::random_tensor(state, seed + 5, DType::f32);
  in.lambdas = Tensor::from_vector<double>(lambdas, {H});
  return in;
}

Tensor up(const Tensor& t, DType dtype) { return t.to(dtype).to(gpu()); }

void check_case(int64_t B, int64_t T, int64_t H, int64_t D, const std::vector<double>& lambdas, DType dtype,
                uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << dtype << " B " << B << " T " << T << " H " << H << " D " << D << " lambda "
                                    << lambdas[0] << ".." << lambdas.back());
  const Shape shape{B, T, H, D}, state{B, H, D, D};
  const double so = 1.0 / std::sqrt(static_cast<double>(D));
  Inputs in = make_inputs(B, T, H, D, lambdas, dtype, seed);
  Tensor out_ref = Tensor::empty(shape), sf_ref = Tensor::empty(state);
  cpu::lightning_forward(out_ref, sf_ref, in.q, in.k, in.v, in.s0, in.lambdas, so, 0, cpu_stream());
  Tensor dq_ref = Tensor::empty(shape), dk_ref = Tensor::empty(shape), dv_ref = Tensor::empty(shape);
  Tensor ds0_ref = Tensor::empty(state);
  cpu::lightning_backward(dq_ref, dk_ref, dv_ref, ds0_ref, in.dout, in.dsf, in.q, in.k, in.v, in.s0, in.lambdas, so, 0,
                          cpu_stream());

  // The root sums of squared terms (bf16 only): the same twin on squared inputs, doubled decays, out_scale^2.
  Tensor out_sq, sf_sq, dq_sq, dk_sq, dv_sq, ds0_sq;
  if (dtype == DType::bf16) {
    std::vector<double> doubled = in.lambdas.to_vector<double>();
    for (double& l : doubled) l *= 2;
    const Tensor lambdas2 = Tensor::from_vector<double>(doubled, {H});
    const Tensor q2 = squared(in.q), k2 = squared(in.k), v2 = squared(in.v), s02 = squared(in.s0);
    out_sq = Tensor::empty(shape), sf_sq = Tensor::empty(state);
    cpu::lightning_forward(out_sq, sf_sq, q2, k2, v2, s02, lambdas2, so * so, 0, cpu_stream());
    dq_sq = Tensor::empty(shape), dk_sq = Tensor::empty(shape), dv_sq = Tensor::empty(shape);
    ds0_sq = Tensor::empty(state);
    cpu::lightning_backward(dq_sq, dk_sq, dv_sq, ds0_sq, squared(in.dout), squared(in.dsf), q2, k2, v2, s02, lambdas2,
                            so * so, 0, cpu_stream());
  }
  auto check = [&](const Tensor& got, const Tensor& ref, const Tensor& sq, DType stored) {
    if (dtype != DType::bf16) return close(got, ref, stored);
    return close_to_rounded_terms(got, ref, sq, stored == DType::bf16 ? std::ldexp(1.0, -8) : 1e-4);
  };

  Tensor qg = up(in.q, dtype), kg = up(in.k, dtype), vg = up(in.v, dtype), dog = up(in.dout, dtype);
  Tensor s0g = in.s0.to(gpu()), dsfg = in.dsf.to(gpu());
  Tensor out = poisoned(shape, dtype), sf = poisoned(state, DType::f32);
  Tensor saved;
  cuda::lightning_forward(out, sf, qg, kg, vg, s0g, in.lambdas, so, 64, gpu_stream(), &saved);
  EXPECT_TRUE(check(out, out_ref, out_sq, dtype)) << "out";
  EXPECT_TRUE(check(sf, sf_ref, sf_sq, DType::f32)) << "final_state";
  // From 1024 tokens (two segments of the 512-token minimum) these small B H split the sequence.
  if (T >= 1024) {
    EXPECT_TRUE(saved.defined()) << "no segment states saved";
  }
  // The backward recomputing its states, then (when the forward saved them) reusing the forward's.
  for (int run = 0; run < (saved.defined() ? 2 : 1); ++run) {
    SCOPED_TRACE(run == 0 ? "states recomputed" : "the forward's states");
    Tensor dq = poisoned(shape, dtype), dk = poisoned(shape, dtype), dv = poisoned(shape, dtype);
    Tensor ds0 = poisoned(state, DType::f32);
    cuda::lightning_backward(dq, dk, dv, ds0, dog, dsfg, qg, kg, vg, s0g, in.lambdas, so, 64, gpu_stream(),
                             run == 0 ? Tensor() : saved);
    EXPECT_TRUE(check(dq, dq_ref, dq_sq, dtype)) << "dq";
    EXPECT_TRUE(check(dk, dk_ref, dk_sq, dtype)) << "dk";
    EXPECT_TRUE(check(dv, dv_ref, dv_sq, dtype)) << "dv";
    EXPECT_TRUE(check(ds0, ds0_ref, ds0_sq, DType::f32)) << "dinitial_state";
  }
}

TEST(CudaLightning, MatchesTheRecurrentCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 2000;
  for (DType dtype : {DType::bf16, DType::f32})
    for (int64_t T : {1, 63, 64, 65, 300})
      for (int64_t D : {16, 64, 128})
        for (const std::vector<double>& lambdas : {std::vector<double>{0.0, 0.0}, std::vector<double>{0.7, 3.0}}) {
          check_case(1, T, 2, D, lambdas, dtype, seed);
          seed += 10;
        }
  report_bound_use("MatchesTheRecurrentCpuTwin");
}

TEST(CudaLightning, MatchesTheCpuTwinOnBatchesMixedDecaysAndOddHeadDims) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 3000;
  for (DType dtype : {DType::bf16, DType::f32}) {
    check_case(2, 130, 3, 40, {0.0, 0.05, 1.5}, dtype, seed);
    check_case(3, 17, 4, 32, {0.01, 0.1, 0.5, 2.0}, dtype, seed + 10);
    check_case(1, 200, 1, 100, {0.02}, dtype, seed + 20);
  }
  report_bound_use("MatchesTheCpuTwinOnBatchesMixedDecaysAndOddHeadDims");
}

// Long sequences are cut into segments (a state-only pass, a scan over the
// segments, the output pass from each segment's entering state): T = 1100 and
// 4097 (a 1-token tail chunk) take several segments, 20000 with strong decay
// many; per-head decays from none to one that empties the state within a chunk.
TEST(CudaLightning, SegmentedLongSequencesMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 5000;
  for (DType dtype : {DType::bf16, DType::f32}) {
    check_case(1, 1100, 3, 128, {0.0, 0.02, 2.0}, dtype, seed);
    check_case(2, 4097, 2, 40, {0.0, 0.3}, dtype, seed + 10);
    check_case(1, 4097, 2, 64, {0.001, 5.0}, dtype, seed + 20);
    seed += 100;
  }
  check_case(1, 20000, 2, 128, {0.5, 4.0}, DType::bf16, seed);
  report_bound_use("SegmentedLongSequencesMatchTheCpuTwin");
}

TEST(CudaLightning, TwoChainedCallsEqualOneCall) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t B = 2, T = 300, T1 = 100, H = 2, D = 64;
  const double so = 0.125;
  const Shape shape{B, T, H, D}, state{B, H, D, D};
  Inputs in = make_inputs(B, T, H, D, {0.0, 0.3}, DType::f32, 4000);
  auto part = [&](const Tensor& t, int64_t start, int64_t len) { return t.narrow(1, start, len).contiguous().to(gpu()); };
  // One call.
  Tensor out = poisoned(shape, DType::f32), sf = poisoned(state, DType::f32);
  Tensor qg = in.q.to(gpu()), kg = in.k.to(gpu()), vg = in.v.to(gpu()), s0g = in.s0.to(gpu()), dsfg = in.dsf.to(gpu());
  cuda::lightning_forward(out, sf, qg, kg, vg, s0g, in.lambdas, so, 64, gpu_stream());
  Tensor dq = poisoned(shape, DType::f32), dk = poisoned(shape, DType::f32), dv = poisoned(shape, DType::f32);
  Tensor ds0 = poisoned(state, DType::f32);
  cuda::lightning_backward(dq, dk, dv, ds0, in.dout.to(gpu()), dsfg, qg, kg, vg, s0g, in.lambdas, so, 64,
                           gpu_stream());
  // Two calls: [0, T1) then [T1, T) starting from the first call's final state.
  const int64_t lens[2] = {T1, T - T1}, starts[2] = {0, T1};
  Tensor outs[2], mids[2], dqs[2], dks[2], dvs[2], ds0s[2];
  Tensor state_in = s0g;
  for (int c = 0; c < 2; ++c) {
    Shape part_shape{B, lens[c], H, D};
    outs[c] = poisoned(part_shape, DType::f32), mids[c] = poisoned(state, DType::f32);
    cuda::lightning_forward(outs[c], mids[c], part(in.q, starts[c], lens[c]), part(in.k, starts[c], lens[c]),
                            part(in.v, starts[c], lens[c]), state_in, in.lambdas, so, 64, gpu_stream());
    state_in = mids[c];
  }
  Tensor ds_in = dsfg;  // dL/dS after the second call, then after the first
  for (int c = 1; c >= 0; --c) {
    Shape part_shape{B, lens[c], H, D};
    dqs[c] = poisoned(part_shape, DType::f32), dks[c] = poisoned(part_shape, DType::f32);
    dvs[c] = poisoned(part_shape, DType::f32), ds0s[c] = poisoned(state, DType::f32);
    cuda::lightning_backward(dqs[c], dks[c], dvs[c], ds0s[c], part(in.dout, starts[c], lens[c]), ds_in,
                             part(in.q, starts[c], lens[c]), part(in.k, starts[c], lens[c]),
                             part(in.v, starts[c], lens[c]), c == 0 ? s0g : mids[0], in.lambdas, so, 64, gpu_stream());
    ds_in = ds0s[c];
  }
  auto whole = [](const Tensor& t) { return t.to(Device::cpu()); };
  auto slice = [&](const Tensor& t, int c) { return whole(t).narrow(1, starts[c], lens[c]).contiguous(); };
  for (int c = 0; c < 2; ++c) {
    SCOPED_TRACE(::testing::Message() << "part " << c);
    EXPECT_TRUE(close(outs[c], slice(out, c), DType::f32)) << "out";
    EXPECT_TRUE(close(dqs[c], slice(dq, c), DType::f32)) << "dq";
    EXPECT_TRUE(close(dks[c], slice(dk, c), DType::f32)) << "dk";
    EXPECT_TRUE(close(dvs[c], slice(dv, c), DType::f32)) << "dv";
  }
  EXPECT_TRUE(close(mids[1], whole(sf), DType::f32)) << "final_state";
  EXPECT_TRUE(close(ds0s[0], whole(ds0), DType::f32)) << "dinitial_state";
}

TEST(CudaLightning, EmptySequenceAndUndefinedStatesAndGradients) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t B = 1, H = 2, D = 64;
  const Shape state{B, H, D, D};
  Tensor lambdas = Tensor::from_vector<double>({0.1, 0.2}, {H});
  // T = 0: the final state is the initial state, dS_initial is dS_final.
  Tensor empty = Tensor::zeros({B, 0, H, D}, DType::bf16, gpu());
  Tensor s0 = testing::random_tensor(state, 5, DType::f32).to(gpu()), dsf = testing::random_tensor(state, 6, DType::f32).to(gpu());
  Tensor sf = poisoned(state, DType::f32), ds0 = poisoned(state, DType::f32);
  cuda::lightning_forward(empty, sf, empty, empty, empty, s0, lambdas, 0.125, 64, gpu_stream());
  EXPECT_TENSOR_CLOSE(sf.to(Device::cpu()), s0.to(Device::cpu()), 0, 0);
  Tensor e1 = empty.clone(), e2 = empty.clone(), e3 = empty.clone();
  cuda::lightning_backward(e1, e2, e3, ds0, empty, dsf, empty, empty, empty, s0, lambdas, 0.125, 64, gpu_stream());
  EXPECT_TENSOR_CLOSE(ds0.to(Device::cpu()), dsf.to(Device::cpu()), 0, 0);
  // Undefined initial state, dout and dfinal_state: zero state in, zero gradients out.
  const Shape shape{B, 65, H, D};
  Tensor q = testing::random_tensor(shape, 7, DType::f32).to(gpu());
  Tensor out = poisoned(shape, DType::f32), sf2 = poisoned(state, DType::f32);
  cuda::lightning_forward(out, sf2, q, q, q, Tensor(), lambdas, 0.125, 64, gpu_stream());
  Tensor out_ref = Tensor::empty(shape), sf_ref = Tensor::empty(state);
  Tensor qc = q.to(Device::cpu());
  cpu::lightning_forward(out_ref, sf_ref, qc, qc, qc, Tensor(), lambdas, 0.125, 0, cpu_stream());
  EXPECT_TRUE(close(out, out_ref, DType::f32));
  EXPECT_TRUE(close(sf2, sf_ref, DType::f32));
  Tensor dq = poisoned(shape, DType::f32), dk = poisoned(shape, DType::f32), dv = poisoned(shape, DType::f32);
  Tensor no_state;
  cuda::lightning_backward(dq, dk, dv, no_state, Tensor(), Tensor(), q, q, q, Tensor(), lambdas, 0.125, 64,
                           gpu_stream());
  for (const Tensor* g : {&dq, &dk, &dv}) EXPECT_TENSOR_CLOSE(g->to(Device::cpu()), Tensor::zeros(shape), 0, 0);
}

TEST(CudaLightning, BadArgumentsAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  const Shape shape{1, 4, 2, 64}, state{1, 2, 64, 64};
  Tensor q = Tensor::zeros(shape, DType::bf16, gpu()), out = Tensor::zeros(shape, DType::bf16, gpu());
  Tensor sf = Tensor::zeros(state, DType::f32, gpu());
  Tensor lambdas = Tensor::from_vector<double>({0.1, -0.5}, {2});
  expect_error([&] { cuda::lightning_forward(out, sf, q, q, q, Tensor(), lambdas, 1.0, 64, gpu_stream()); },
               "decay_lambdas[1] = -0.5");
  Tensor good = Tensor::from_vector<double>({0.1, 0.5}, {2});
  expect_error([&] { cuda::lightning_forward(out, sf, q, q, q, Tensor(), good.to(gpu()), 1.0, 64, gpu_stream()); },
               "CPU tensor");
  Tensor sf_bf16 = Tensor::zeros(state, DType::bf16, gpu());
  expect_error([&] { cuda::lightning_forward(out, sf_bf16, q, q, q, Tensor(), good, 1.0, 64, gpu_stream()); },
               "final_state dtype");
  Tensor wide = Tensor::zeros({1, 4, 2, 192}, DType::bf16, gpu());
  expect_error([&] { cuda::lightning_forward(wide, sf, wide, wide, wide, Tensor(), good, 1.0, 64, gpu_stream()); },
               "D = 192");
  // Saved segment states from another sequence length, or of the wrong shape.
  const Shape long_shape{1, 4096, 2, 64};
  Tensor ql = Tensor::zeros(long_shape, DType::bf16, gpu()), outl = Tensor::zeros(long_shape, DType::bf16, gpu());
  Tensor saved;
  cuda::lightning_forward(outl, sf, ql, ql, ql, Tensor(), good, 1.0, 64, gpu_stream(), &saved);
  ASSERT_TRUE(saved.defined());
  Tensor dq = Tensor::zeros(shape, DType::bf16, gpu()), dk = dq.clone(), dv = dq.clone(), none;
  expect_error([&] { cuda::lightning_backward(dq, dk, dv, none, q, Tensor(), q, q, q, Tensor(), good, 1.0, 64,
                                              gpu_stream(), saved); },
               "do not fit T = 4");
  Tensor flat = Tensor::zeros({2, 2, 64, 64}, DType::f32, gpu());
  expect_error([&] { cuda::lightning_backward(dq, dk, dv, none, q, Tensor(), q, q, q, Tensor(), good, 1.0, 64,
                                              gpu_stream(), flat); },
               "saved_states (2, 2, 64, 64)");
}

}  // namespace
}  // namespace loom
