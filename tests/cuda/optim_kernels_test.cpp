// Fused AdamW and grad-norm CUDA kernels against their CPU twins. AdamW
// repeats the CPU twin's arithmetic operation for operation (no fused
// multiply-adds), so the master and moments must agree to the last bit or
// two (rtol 2^-22, i.e. 2 fp32 ulps; f64: 2^-50) over several steps; the
// 16-bit compute copy is the rounded master (one bf16 rounding). The spans
// include sizes that are not multiples of the vector width or of the 16384-
// element chunk, unaligned pointers, every (grad, compute) dtype pair used in
// training, and more spans than one launch table holds (96). Sums of squares
// are f64 on both sides (different order: rtol 1e-12); counts and scales are exact.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/adamw.h"
#include "kernels/cpu/grad_norm.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/grad_norm.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using cuda_testing::cpu_stream;
using cuda_testing::gpu;
using cuda_testing::gpu_stream;

// Contiguous CUDA copy (raw bytes) of a host tensor; `misalign` shifts the start by one element.
Tensor upload(const Tensor& host, bool misalign = false) {
  Tensor buffer = Tensor::empty({host.numel() + 1}, host.dtype(), gpu());
  Tensor t = buffer.narrow(0, misalign ? 1 : 0, host.numel()).view(host.shape());
  t.copy_(host.contiguous());
  return t;
}
Tensor download(const Tensor& t) { return t.to(Device::cpu()); }

// n units in the last place of `dtype`, relative.
double ulps(DType dtype, double n) {
  int bits = dtype == DType::f64 ? 52 : dtype == DType::f32 ? 23 : dtype == DType::f16 ? 10 : 7;
  return std::ldexp(n, -bits);
}

// Host state of one AdamW span and its device twin.
struct SpanCase {
  int64_t n;
  DType master, grad, compute;  // compute u8 = none
  double weight_decay;
  bool misalign;
};

struct SpanState {
  Tensor p, m, v, c, g;  // host
  Tensor dp, dm, dv, dc, dg;  // device
};

SpanState make_state(const SpanCase& sc, uint64_t seed) {
  SpanState st;
  st.p = testing::random_tensor({sc.n}, seed, sc.master);
  st.m = testing::random_tensor({sc.n}, seed + 1, sc.master, 0.1);
  Tensor v = testing::random_tensor({sc.n}, seed + 2, sc.master, 0.01);
  st.v = v.to(DType::f64);
  double* pv = st.v.data<double>();
  for (int64_t i = 0; i < sc.n; ++i) pv[i] = pv[i] * pv[i];  // second moments are >= 0
  st.v = st.v.to(sc.master);
  if (sc.compute != DType::u8) st.c = st.p.to(sc.compute).clone();  // to() returns p itself for the same dtype
  st.dp = upload(st.p, sc.misalign);
  st.dm = upload(st.m, sc.misalign);
  st.dv = upload(st.v);
  if (sc.compute != DType::u8) st.dc = upload(Tensor::full({sc.n}, NAN, DType::f32).to(sc.compute), sc.misalign);
  return st;
}

void expect_state_equal(const SpanState& st, const SpanCase& sc) {
  const double tol = ulps(sc.master, 2);
  EXPECT_TENSOR_CLOSE(download(st.dp), st.p, tol, 0.0) << "param";
  EXPECT_TENSOR_CLOSE(download(st.dm), st.m, tol, 0.0) << "exp_avg";
  EXPECT_TENSOR_CLOSE(download(st.dv), st.v, tol, 0.0) << "exp_avg_sq";
  if (sc.compute != DType::u8) {
    EXPECT_TENSOR_CLOSE(download(st.dc).to(DType::f64), st.c.to(DType::f64), ulps(sc.compute, 1), 0.0) << "compute";
  }
}

std::vector<SpanCase> span_cases() {
  std::vector<SpanCase> cases;
  const int64_t sizes[] = {1, 3, 17, 65, 4099, 16384, 40000};
  int k = 0;
  for (int64_t n : sizes) {
    for (auto [grad, compute] : {std::pair{DType::f32, DType::bf16}, {DType::f32, DType::u8}, {DType::bf16, DType::bf16},
                                 {DType::f32, DType::f32}, {DType::f16, DType::f16}}) {
      cases.push_back({n, DType::f32, grad, compute, (k % 2) ? 0.1 : 0.0, (k % 3) == 1});
      ++k;
    }
    cases.push_back({n, DType::f64, DType::f64, DType::u8, 0.05, false});
    cases.push_back({n, DType::f64, DType::f32, DType::bf16, 0.0, true});
  }
  return cases;
}

cpu::AdamWScalars scalars_for(int64_t step) {
  cpu::AdamWScalars sc;
  sc.lr = 3e-3;
  sc.beta1 = 0.9;
  sc.beta2 = 0.95;
  sc.eps = 1e-8;
  sc.weight_decay = 0.1;
  sc.step = step;
  return sc;
}

TEST(CudaAdamW, SingleSpanStepsEqualTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 2000;
  for (const SpanCase& sc : span_cases()) {
    SCOPED_TRACE(::testing::Message() << "n " << sc.n << " master " << sc.master << " grad " << sc.grad << " compute "
                                      << sc.compute << " wd " << sc.weight_decay << " misalign " << sc.misalign);
    SpanState st = make_state(sc, seed);
    seed += 10;
    for (int64_t step = 1; step <= 3; ++step) {
      Tensor g = testing::random_tensor({sc.n}, seed++, DType::f32).to(sc.grad);
      Tensor dg = upload(g, sc.misalign);
      cpu::AdamWScalars scalars = scalars_for(step);
      scalars.weight_decay = sc.weight_decay;
      cpu::adamw_step(st.p, st.m, st.v, st.c, g, scalars, cpu_stream());
      cuda::adamw_step(st.dp, st.dm, st.dv, st.dc, dg, scalars, gpu_stream());
    }
    expect_state_equal(st, sc);
  }
}

TEST(CudaAdamW, ManySpansInFewLaunchesEqualTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  std::vector<SpanCase> cases = span_cases();
  while (cases.size() < 130) cases.push_back({static_cast<int64_t>(cases.size() * 7 + 1), DType::f32, DType::f32,
                                               DType::bf16, 0.1, cases.size() % 2 == 0});
  cases.push_back({0, DType::f32, DType::f32, DType::bf16, 0.1, false});  // an empty span is allowed
  uint64_t seed = 3000;
  std::vector<SpanState> states;
  for (const SpanCase& sc : cases) {
    states.push_back(make_state(sc, seed));
    seed += 10;
  }
  for (int64_t step = 1; step <= 2; ++step) {
    cpu::AdamWScalars scalars = scalars_for(step);
    std::vector<cuda::AdamWSpan> spans;
    for (size_t i = 0; i < cases.size(); ++i) {
      Tensor g = testing::random_tensor({cases[i].n}, seed++, DType::f32).to(cases[i].grad);
      cpu::AdamWScalars own = scalars;
      own.weight_decay = cases[i].weight_decay;
      SpanState& st = states[i];
      cpu::adamw_step(st.p, st.m, st.v, st.c, g, own, cpu_stream());
      spans.push_back({st.dp, st.dm, st.dv, st.dc, upload(g, cases[i].misalign), cases[i].weight_decay});
    }
    cuda::adamw_step_many(spans, scalars, gpu_stream());
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "span " << i << " n " << cases[i].n << " master " << cases[i].master
                                      << " grad " << cases[i].grad << " compute " << cases[i].compute);
    expect_state_equal(states[i], cases[i]);
  }
}

TEST(CudaAdamW, BadArgumentsAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor p = Tensor::zeros({8}, DType::f32, gpu()), m = Tensor::zeros({8}, DType::f32, gpu());
  Tensor v = Tensor::zeros({8}, DType::f32, gpu()), c = Tensor::zeros({8}, DType::bf16, gpu());
  Tensor g = Tensor::zeros({7}, DType::f32, gpu());
  try {
    cuda::adamw_step(p, m, v, c, g, scalars_for(1), gpu_stream());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("grad has 7 elements"), std::string::npos) << e.what();
  }
  Tensor g8 = Tensor::zeros({8}, DType::f32, gpu());
  EXPECT_THROW(cuda::adamw_step(p, m, v, c, g8, scalars_for(0), gpu_stream()), Error);
  Tensor alias = p.view({8});
  EXPECT_THROW(cuda::adamw_step(p, m, v, alias, g8, scalars_for(1), gpu_stream()), Error);
  Tensor p16 = Tensor::zeros({8}, DType::bf16, gpu());
  EXPECT_THROW(cuda::adamw_step(p16, m, v, c, g8, scalars_for(1), gpu_stream()), Error);
}

TEST(CudaGradNorm, SumSquaresCountAndScaleMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 4000;
  for (DType dtype : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{17}, int64_t{65}, int64_t{4099}, (int64_t{1} << 20) + 5}) {
      for (bool misalign : {false, true}) {
        SCOPED_TRACE(::testing::Message() << dtype << " n " << n << " misalign " << misalign);
        Tensor x = testing::random_tensor({n}, seed++, DType::f64).to(dtype);
        Tensor xg = upload(x, misalign);
        Tensor ref = Tensor::zeros({}, DType::f64);
        cpu::sum_squares(ref, x, cpu_stream());
        Tensor out = upload(Tensor::full({}, NAN, DType::f64));
        cuda::sum_squares(out, xg, gpu_stream());
        EXPECT_TENSOR_CLOSE(download(out), ref, 1e-12, 0.0) << "sum_squares";
        // Non-finite entries at both ends and in the middle.
        Tensor bad = x.to(DType::f64).clone();  // to() returns x itself for f64: keep x finite
        double* pb = bad.data<double>();
        pb[0] = NAN;
        pb[n / 2] = INFINITY;
        pb[n - 1] = -INFINITY;
        Tensor bad_x = bad.to(dtype);
        Tensor count_ref = Tensor::zeros({}, DType::i64), count = upload(Tensor::full({}, -1.0, DType::i64));
        cpu::count_nonfinite(count_ref, bad_x, cpu_stream());
        cuda::count_nonfinite(count, upload(bad_x, misalign), gpu_stream());
        EXPECT_EQ(download(count).item(), count_ref.item());
        Tensor scaled = x.clone();
        cpu::scale_inplace(scaled, 0.3, cpu_stream());
        cuda::scale_inplace(xg, 0.3, gpu_stream());
        EXPECT_TENSOR_CLOSE(download(xg).to(DType::f64), scaled.to(DType::f64), 0.0, 0.0) << "scale_inplace";
      }
    }
  }
}

TEST(CudaGradNorm, ManyTensorsPerTensorResultsAreReproducible) {
  LOOM_SKIP_WITHOUT_GPU();
  std::vector<Tensor> host, dev;
  const DType dtypes[] = {DType::f32, DType::bf16, DType::f32, DType::f64};
  for (int i = 0; i < 120; ++i) {
    int64_t n = i == 5 ? 0 : (i * 997) % 50000 + 1;
    Tensor x = testing::random_tensor({n}, 5000 + i, DType::f64).to(dtypes[i % 4]);
    if (i % 7 == 0 && n > 2) {
      Tensor d = x.to(DType::f64);
      d.data<double>()[n / 3] = NAN;
      x = d.to(dtypes[i % 4]);
    }
    host.push_back(x);
    dev.push_back(upload(x, i % 3 == 0));
  }
  Tensor sums = upload(Tensor::full({120}, NAN, DType::f64));
  Tensor counts = upload(Tensor::full({120}, -1.0, DType::i64));
  cuda::sum_squares_many(sums, dev, gpu_stream());
  cuda::count_nonfinite_many(counts, dev, gpu_stream());
  Tensor again = upload(Tensor::full({120}, NAN, DType::f64));
  cuda::sum_squares_many(again, dev, gpu_stream());
  EXPECT_TENSOR_CLOSE(download(again), download(sums), 0.0, 0.0) << "second run differs";
  std::vector<double> got = download(sums).to_vector<double>();
  std::vector<int64_t> got_counts = download(counts).to_vector<int64_t>();
  for (size_t i = 0; i < host.size(); ++i) {
    Tensor ref = Tensor::zeros({}, DType::f64), count_ref = Tensor::zeros({}, DType::i64);
    cpu::sum_squares(ref, host[i], cpu_stream());
    cpu::count_nonfinite(count_ref, host[i], cpu_stream());
    double want = ref.item();
    if (std::isnan(want)) EXPECT_TRUE(std::isnan(got[i])) << "tensor " << i;
    else EXPECT_NEAR(got[i], want, 1e-12 * std::fabs(want)) << "tensor " << i;
    EXPECT_EQ(got_counts[i], static_cast<int64_t>(count_ref.item())) << "tensor " << i;
  }
  cuda::scale_inplace_many(dev, -2.0, gpu_stream());
  for (size_t i = 0; i < host.size(); ++i) {
    Tensor ref = host[i].clone();
    cpu::scale_inplace(ref, -2.0, cpu_stream());
    EXPECT_TENSOR_CLOSE(download(dev[i]).to(DType::f64), ref.to(DType::f64), 0.0, 0.0) << "tensor " << i;
  }
}

}  // namespace
}  // namespace loom
