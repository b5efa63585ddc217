// Device dispatch and CUDA placement, against the CPU: Tensor copies, casts and
// fills on the device (strided views, every dtype pair used in training),
// staged uploads, memory statistics, the differentiable ops on CUDA (f32 and
// bf16) against the same ops on CPU (outputs and every gradient), mixed
// precision gradients (fp32 buffers for bf16 leaves, dtype-consistent
// gradients inside the graph), AdamW and clipping on CUDA, Module::to, and
// the error for operands on two devices.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "framework/ops_moe.h"
#include "framework/storage.h"
#include "kernels/dispatch.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "tests/testing.h"

namespace loom {
namespace {

const Device kGpu = Device::cuda(0);

// Host f64 copy of any tensor, for comparisons.
Tensor host64(const Tensor& t) { return t.to(Device::cpu()).to(DType::f64).contiguous(); }

::testing::AssertionResult same_values(const Tensor& gpu, const Tensor& cpu, double rtol, double atol) {
  return testing::tensors_close(host64(gpu), host64(cpu), rtol, atol);
}

// Tolerances for a result computed in `dtype` storage (fp32 math, one rounding per op).
double rtol_for(DType dtype) { return dtype == DType::bf16 ? 2e-2 : 1e-5; }
double atol_for(DType dtype) { return dtype == DType::bf16 ? 2e-2 : 1e-5; }

// ---------------------------------------------------------------- Tensor layer

TEST(CudaTensor, StridedCopiesAndCastsMatchTheHost) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor base = testing::random_tensor({3, 17, 5}, 1, DType::f32);  // (3, 17, 5)
  Tensor gpu = base.to(kGpu);
  // Views: transpose, stepped slice, expand (stride 0), select.
  std::vector<std::pair<Tensor, Tensor>> views = {
      {base.transpose(0, 2), gpu.transpose(0, 2)},
      {base.slice(1, 1, 17, 3), gpu.slice(1, 1, 17, 3)},
      {base.select(2, 4).unsqueeze(0).expand({4, 3, 17}), gpu.select(2, 4).unsqueeze(0).expand({4, 3, 17})},
  };
  for (auto& [host_view, gpu_view] : views) {
    for (DType to : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
      SCOPED_TRACE(::testing::Message() << "view " << shape_str(host_view.shape()) << " to " << to);
      Tensor expected = host_view.to(to).contiguous();
      Tensor got = gpu_view.to(to).contiguous();  // device kernel (cast + relayout)
      EXPECT_EQ(got.device(), kGpu);
      EXPECT_TRUE(got.is_contiguous());
      EXPECT_TRUE(same_values(got, expected, 0, 0));  // same rounding as the host conversion
    }
  }
  // Integer casts stay exact beyond 2^24.
  // (Values outside i32's range have no agreed i64 -> i32 result, so the i32 case stays in range.)
  Tensor ids = Tensor::from_vector<int64_t>({0, 1, (int64_t{1} << 30) + 3, -7, 123456789}, {5});
  EXPECT_EQ(ids.to(kGpu).to(DType::i32).to(Device::cpu()).to_vector<int32_t>(), ids.to(DType::i32).to_vector<int32_t>());
  Tensor wide = Tensor::from_vector<int64_t>({0, (int64_t{1} << 40) + 3, -7}, {3});
  EXPECT_EQ(wide.to(kGpu).to(Device::cpu()).to_vector<int64_t>(), wide.to_vector<int64_t>());
}

// Dense row-major sides take the element-for-element kernel: casts between every
// floating pair (bf16/f16/f32 through float alone), a source that starts past
// its buffer's first element (a row slice), a destination row slice, and
// size-1 dims with any stride, all bitwise the host conversion.
TEST(CudaTensor, DenseCastsAndCopiesMatchTheHost) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor base = testing::random_tensor({5, 4099}, 3, DType::f64, 70.0);  // past bf16/f16 precision, within f16 range
  const DType floats[] = {DType::f64, DType::f32, DType::bf16, DType::f16};
  for (DType from : floats) {
    Tensor host_src = base.to(from);
    Tensor gpu_src = host_src.to(kGpu);
    for (DType to : floats) {
      SCOPED_TRACE(::testing::Message() << from << " -> " << to);
      EXPECT_TRUE(same_values(gpu_src.to(to), host_src.to(to), 0, 0)) << "whole tensor";
      // Rows 2..4 of the source (offset 2 * 4099) into rows 1..3 of a poisoned destination.
      Tensor dst = Tensor::full({5, 4099}, NAN, to, kGpu);
      dst.narrow(0, 1, 3).copy_(gpu_src.narrow(0, 2, 3));
      Tensor expected = Tensor::full({5, 4099}, NAN, to);
      expected.narrow(0, 1, 3).copy_(host_src.narrow(0, 2, 3));
      EXPECT_TRUE(same_values(dst, expected, 0, 0)) << "row slices (rows 0 and 4 stay NaN)";
      // A size-1 dim with an unusual stride is still dense.
      Tensor row = gpu_src.narrow(0, 3, 1).unsqueeze(1);  // (1, 1, 4099)
      EXPECT_TRUE(same_values(row.to(to), host_src.narrow(0, 3, 1).unsqueeze(1).to(to), 0, 0)) << "size-1 dims";
    }
  }
}

TEST(CudaTensor, CopiesIntoStridedDestinationsAndAcrossDevices) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor src = testing::random_tensor({7, 9}, 2, DType::f32);
  // Host (f32) -> strided device view (bf16): upload, then cast + relayout on the device.
  Tensor dst = Tensor::full({9, 7}, NAN, DType::bf16, kGpu);
  Tensor window = dst.transpose(0, 1);  // (7, 9) view
  window.copy_(src);
  EXPECT_TRUE(same_values(dst, src.transpose(0, 1).to(DType::bf16), 0, 0));
  // Device strided view -> host strided view.
  Tensor host_dst = Tensor::full({9, 7}, NAN, DType::f64);
  host_dst.transpose(0, 1).copy_(dst.transpose(0, 1));
  EXPECT_TRUE(same_values(host_dst, src.transpose(0, 1).to(DType::bf16), 0, 0));
}

TEST(CudaTensor, FillsStridedViews) {
  LOOM_SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::f32, DType::bf16, DType::i64, DType::u8}) {
    Tensor t = Tensor::zeros({5, 6}, dtype, kGpu);
    t.slice(1, 1, 6, 2).fill_(3.0);  // columns 1, 3, 5
    Tensor expected = Tensor::zeros({5, 6}, dtype);
    expected.slice(1, 1, 6, 2).fill_(3.0);
    EXPECT_TRUE(same_values(t, expected, 0, 0)) << dtype;
    Tensor ones = Tensor::ones({3, 1}, dtype, kGpu).expand({3, 4}).contiguous();
    EXPECT_TRUE(same_values(ones, Tensor::ones({3, 4}, dtype), 0, 0)) << dtype;
  }
}

TEST(CudaTensor, StagedUploadsDoNotDependOnTheSourceBufferAfterwards) {
  LOOM_SKIP_WITHOUT_GPU();
  // Many small uploads from one host buffer that is overwritten right after
  // each copy: each device tensor must keep the value it was given.
  Tensor host = Tensor::zeros({1000}, DType::i64);
  std::vector<Tensor> uploaded;
  for (int i = 0; i < 12; ++i) {  // more uploads than staging slots
    host.fill_(static_cast<double>(i));
    uploaded.push_back(host.to(kGpu));
  }
  host.fill_(-1.0);
  for (int i = 0; i < 12; ++i)
    EXPECT_TRUE(same_values(uploaded[i], Tensor::full({1000}, i, DType::i64), 0, 0)) << "upload " << i;
  // A large upload (unstaged path).
  Tensor big = testing::random_tensor({3 << 20}, 3, DType::f32);
  EXPECT_TRUE(same_values(big.to(kGpu), big, 0, 0));
}

TEST(CudaTensor, MemoryStatsCountDeviceStorage) {
  LOOM_SKIP_WITHOUT_GPU();
  MemoryStats before = memory_stats(kGpu);
  reset_peak_memory(kGpu);
  {
    Tensor t = Tensor::empty({1 << 20}, DType::f32, kGpu);  // 4 MiB
    MemoryStats during = memory_stats(kGpu);
    EXPECT_EQ(during.current_bytes - before.current_bytes, int64_t{4} << 20);
    EXPECT_GE(during.peak_bytes, during.current_bytes);
    EXPECT_EQ(during.allocations, before.allocations + 1);
  }
  MemoryStats after = memory_stats(kGpu);
  EXPECT_EQ(after.current_bytes, before.current_bytes);
  EXPECT_GE(after.peak_bytes, before.current_bytes + (int64_t{4} << 20));
}

// ---------------------------------------------------------------- ops: CUDA vs CPU

// Runs `fn` on CPU f32 inputs and on the same inputs on the GPU in `dtype`,
// back-propagates the same random output gradients, and compares outputs and
// input gradients.
void expect_op_matches_cpu(const std::function<std::vector<Variable>(const std::vector<Variable>&)>& fn,
                           const std::vector<Tensor>& inputs, DType dtype, uint64_t seed) {
  std::vector<Variable> cpu_in, gpu_in;
  for (const Tensor& t : inputs) {
    Tensor rounded = t.to(dtype).to(DType::f32);  // both sides start from the same numbers
    cpu_in.emplace_back(rounded, true);
    gpu_in.emplace_back(rounded.to(kGpu).to(dtype), true);
  }
  std::vector<Variable> cpu_out = fn(cpu_in), gpu_out = fn(gpu_in);
  ASSERT_EQ(cpu_out.size(), gpu_out.size());
  std::vector<Tensor> cpu_grads, gpu_grads;
  for (size_t i = 0; i < cpu_out.size(); ++i) {
    ASSERT_EQ(gpu_out[i].device(), kGpu);
    EXPECT_TRUE(same_values(gpu_out[i].data(), cpu_out[i].data(), rtol_for(dtype), atol_for(dtype))) << "output " << i;
    Tensor g = testing::random_tensor(cpu_out[i].shape(), seed + i, DType::f32).to(dtype).to(DType::f32);
    cpu_grads.push_back(g);
    gpu_grads.push_back(g.to(kGpu).to(gpu_out[i].dtype()));
  }
  run_backward(cpu_out, cpu_grads);
  run_backward(gpu_out, gpu_grads);
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_TRUE(gpu_in[i].grad().defined()) << "input " << i;
    // Mixed precision: gradient buffers of 16-bit leaves are fp32.
    EXPECT_EQ(gpu_in[i].grad().dtype(), dtype == DType::bf16 ? DType::f32 : dtype) << "input " << i;
    EXPECT_EQ(gpu_in[i].grad().device(), kGpu);
    EXPECT_TRUE(same_values(gpu_in[i].grad(), cpu_in[i].grad(), rtol_for(dtype), atol_for(dtype) * 4))
        << "gradient of input " << i;
  }
}

class CudaOps : public ::testing::TestWithParam<DType> {};

TEST_P(CudaOps, LinearAndMatmulMatchTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  DType dtype = GetParam();
  for (int64_t in : {1, 17, 65}) {
    SCOPED_TRACE(::testing::Message() << dtype << " In " << in);
    expect_op_matches_cpu([](const std::vector<Variable>& v) { return std::vector<Variable>{linear(v[0], v[1])}; },
                          {testing::random_tensor({2, 3, in}, 10, DType::f32), testing::random_tensor({5, in}, 11, DType::f32)},
                          dtype, 12);
  }
  // Batched matmul, b broadcast over a's batch (one GEMM over stacked rows) and a transposed view.
  expect_op_matches_cpu(
      [](const std::vector<Variable>& v) {
        return std::vector<Variable>{matmul(v[0], v[1]), matmul(transpose(v[0], 1, 2), v[2])};
      },
      {testing::random_tensor({3, 7, 9}, 13, DType::f32), testing::random_tensor({9, 4}, 14, DType::f32),
       testing::random_tensor({3, 7, 2}, 15, DType::f32)},
      dtype, 16);
}

TEST_P(CudaOps, NormActivationRopeEmbeddingMatchTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  DType dtype = GetParam();
  expect_op_matches_cpu(
      [](const std::vector<Variable>& v) { return std::vector<Variable>{rms_norm(v[0], v[1], 1e-6)}; },
      {testing::random_tensor({4, 3, 65}, 20, DType::f32), testing::random_tensor({65}, 21, DType::f32)}, dtype, 22);
  expect_op_matches_cpu([](const std::vector<Variable>& v) { return std::vector<Variable>{swiglu(v[0], v[1])}; },
                        {testing::random_tensor({3, 17}, 23, DType::f32), testing::random_tensor({3, 17}, 24, DType::f32)},
                        dtype, 25);
  Tensor positions = Tensor::from_vector<int64_t>({5, 0, 900, 3}, {4});  // host positions: the op uploads them
  expect_op_matches_cpu(
      [&](const std::vector<Variable>& v) { return std::vector<Variable>{rope(v[0], positions, 10000.0)}; },
      {testing::random_tensor({2, 4, 3, 8}, 26, DType::f32)}, dtype, 27);
  Tensor ids = Tensor::from_vector<int64_t>({3, 0, 3, 6, 1}, {5});  // repeated id: gradients add up
  expect_op_matches_cpu([&](const std::vector<Variable>& v) { return std::vector<Variable>{embedding(v[0], ids)}; },
                        {testing::random_tensor({7, 9}, 28, DType::f32)}, dtype, 29);
}

TEST_P(CudaOps, ArithmeticReductionsAndShapesMatchTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  DType dtype = GetParam();
  expect_op_matches_cpu(
      [](const std::vector<Variable>& v) {
        Variable ab = mul(add(v[0], v[1]), sub(v[0], scale(v[1], 0.5)));  // (3, 17) with b broadcast from (17)
        return std::vector<Variable>{ab, sum(ab, 1), mean(v[0]), concat({v[0], narrow(v[0], 1, 2, 5)}, 1)};
      },
      {testing::random_tensor({3, 17}, 30, DType::f32), testing::random_tensor({17}, 31, DType::f32)}, dtype, 32);
}

TEST_P(CudaOps, SoftmaxAndCrossEntropyMatchTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  DType dtype = GetParam();
  Tensor targets = Tensor::from_vector<int64_t>({4, -100, 0, 64}, {4});
  expect_op_matches_cpu(
      [&](const std::vector<Variable>& v) {
        return std::vector<Variable>{softmax(v[0], 0), cross_entropy(v[0], targets)};
      },
      {testing::random_tensor({4, 65}, 33, DType::f32)}, dtype, 34);
}

TEST_P(CudaOps, AttentionMatchesTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  DType dtype = GetParam();
  expect_op_matches_cpu(
      [](const std::vector<Variable>& v) {
        AttentionResult r = attention(v[0], v[1], v[2], AttentionOptions{});
        return std::vector<Variable>{r.out, r.lse};
      },
      {testing::random_tensor({2, 17, 4, 8}, 35, DType::f32), testing::random_tensor({2, 17, 2, 8}, 36, DType::f32),
       testing::random_tensor({2, 17, 2, 8}, 37, DType::f32)},
      dtype, 38);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::f32, DType::bf16),
                         [](const ::testing::TestParamInfo<DType>& info) { return dtype_name(info.param); });

// ---------------------------------------------------------------- mixed precision autograd

TEST(CudaAutograd, Bf16LeavesGetFp32GradientsAndInnerGradientsKeepTheirDtype) {
  LOOM_SKIP_WITHOUT_GPU();
  // w is used twice (accumulated in fp32); h = linear(x, w) is a bf16 inner
  // node whose consumer (rms_norm) produces an fp32 weight gradient for g.
  Tensor x0 = testing::random_tensor({4, 9}, 40, DType::f32).to(DType::bf16);
  Tensor w0 = testing::random_tensor({9, 9}, 41, DType::f32).to(DType::bf16);
  Variable x(x0.to(kGpu), true), w(w0.to(kGpu), true), g(Tensor::ones({9}, DType::bf16, kGpu), true);
  Variable h = rms_norm(linear(linear(x, w), w), g, 1e-6);  // (4, 9) bf16
  EXPECT_EQ(h.dtype(), DType::bf16);
  h.backward(Tensor::ones({4, 9}, DType::bf16, kGpu));
  EXPECT_EQ(w.grad().dtype(), DType::f32);
  EXPECT_EQ(g.grad().dtype(), DType::f32);
  EXPECT_EQ(x.grad().dtype(), DType::f32);
  // The same graph on CPU in f32 from the same (bf16-rounded) numbers.
  Variable xc(x0.to(DType::f32), true), wc(w0.to(DType::f32), true), gc(Tensor::ones({9}), true);
  rms_norm(linear(linear(xc, wc), wc), gc, 1e-6).backward(Tensor::ones({4, 9}));
  EXPECT_TRUE(same_values(w.grad(), wc.grad(), 5e-2, 5e-2));
  EXPECT_TRUE(same_values(g.grad(), gc.grad(), 5e-2, 5e-2));
  EXPECT_TRUE(same_values(x.grad(), xc.grad(), 5e-2, 5e-2));
}

TEST(CudaAutograd, OperandsOnTwoDevicesAreAnErrorNamingBoth) {
  LOOM_SKIP_WITHOUT_GPU();
  Variable x(Tensor::ones({2, 3}), false), w(Tensor::ones({4, 3}, DType::f32, kGpu), false);
  try {
    linear(x, w);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("linear"), std::string::npos) << what;
    EXPECT_NE(what.find("cuda:0"), std::string::npos) << what;
    EXPECT_NE(what.find("cpu"), std::string::npos) << what;
  }
}

// ---------------------------------------------------------------- modules and optimizer

TEST(CudaModule, ToDeviceAndDtypeKeepValuesAndVariables) {
  LOOM_SKIP_WITHOUT_GPU();
  Linear layer(17, 5, true);
  layer.initialize(7, 0.02, 1);
  Tensor before = layer.weight().data().clone();
  Variable handle = layer.weight();
  layer.to(kGpu);
  layer.to(DType::bf16);
  EXPECT_EQ(layer.weight().device(), kGpu);
  EXPECT_EQ(layer.weight().dtype(), DType::bf16);
  EXPECT_EQ(handle.impl(), layer.weight().impl());  // same Variable: optimizers and hooks keep working
  EXPECT_TRUE(same_values(layer.weight().data(), before.to(DType::bf16), 0, 0));
}

TEST(CudaOptim, AdamWWithBf16ComputeWeightsMatchesTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  // The same bf16 parameters, fp32 masters and fp32 gradients on both devices
  // (the CPU kernel also writes a bf16 compute copy); three steps.
  Tensor w0 = testing::random_tensor({65, 3}, 50, DType::f32).to(DType::bf16);
  Tensor b0 = testing::random_tensor({65}, 51, DType::f32).to(DType::bf16);
  std::vector<Parameter> cpu_params{{"w", Variable(w0.clone(), true), {}}, {"b", Variable(b0.clone(), true), {}}};
  cpu_params[1].attrs.weight_decay = false;
  std::vector<Parameter> gpu_params{{"w", Variable(w0.to(kGpu), true), {}}, {"b", Variable(b0.to(kGpu), true), {}}};
  gpu_params[1].attrs.weight_decay = false;
  AdamWConfig config;
  AdamW cpu_opt(cpu_params, config), gpu_opt(gpu_params, config);
  for (int step = 0; step < 3; ++step) {
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      Tensor g = testing::random_tensor(cpu_params[i].var.shape(), 60 + 10 * step + i, DType::f32);
      cpu_params[i].var.set_grad(g);
      gpu_params[i].var.set_grad(g.to(kGpu));
    }
    cpu_opt.step(1e-2);
    gpu_opt.step(1e-2);
  }
  for (const char* name : {"w", "b"}) {
    EXPECT_TRUE(same_values(gpu_opt.master(name), cpu_opt.master(name), 1e-5, 1e-6)) << name;
    EXPECT_TRUE(same_values(gpu_opt.exp_avg_sq(name), cpu_opt.exp_avg_sq(name), 1e-5, 1e-9)) << name;
  }
  // bf16 compute copies agree to within one bf16 step (masters may round to either side of a tie).
  EXPECT_TRUE(same_values(gpu_params[0].var.data(), cpu_params[0].var.data(), 1e-2, 1e-6));
  EXPECT_EQ(gpu_params[0].var.dtype(), DType::bf16);
  // The compute copy is the master rounded to bf16.
  EXPECT_TRUE(same_values(gpu_params[0].var.data(), gpu_opt.master("w").to(DType::bf16), 0, 0));
}

TEST(CudaOptim, GradNormClippingAndFinitenessMatchTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  std::vector<Parameter> cpu_params, gpu_params;
  for (int i = 0; i < 3; ++i) {
    Shape shape{17 + i, 3};
    Tensor g = testing::random_tensor(shape, 70 + i, DType::f32);
    std::string name(1, 'p');  // built by append: GCC 12 warns (-Wrestrict, a false positive) on "p" + to_string
    name += std::to_string(i);
    cpu_params.push_back({name, Variable(Tensor::zeros(shape), true), {}});
    gpu_params.push_back({name, Variable(Tensor::zeros(shape, DType::bf16, kGpu), true), {}});
    cpu_params.back().var.set_grad(g);
    gpu_params.back().var.set_grad(g.to(kGpu));
  }
  EXPECT_NEAR(grad_norm(gpu_params), grad_norm(cpu_params), 1e-9 * grad_norm(cpu_params));
  EXPECT_TRUE(grads_finite(gpu_params));
  double cpu_norm = clip_grad_norm(cpu_params, 1.0), gpu_norm = clip_grad_norm(gpu_params, 1.0);
  EXPECT_NEAR(gpu_norm, cpu_norm, 1e-9 * cpu_norm);
  for (size_t i = 0; i < cpu_params.size(); ++i)
    EXPECT_TRUE(same_values(gpu_params[i].var.grad(), cpu_params[i].var.grad(), 1e-6, 1e-7)) << i;
  Tensor bad = gpu_params[1].var.grad();
  bad.narrow(0, 3, 1).fill_(NAN);
  EXPECT_FALSE(grads_finite(gpu_params));
}

}  // namespace
}  // namespace loom
