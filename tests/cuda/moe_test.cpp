// CUDA MoE dispatch kernels against the CPU twins (kernels/cpu/moe.h): row
// gather and scatter-add with repeated and absent indices (bitwise repeatable),
// log-sum-exp with -inf rows, top-k with ties (lower column first) and k = E,
// the grouped linear with empty experts (zero weight gradients) and f32
// gradient buffers for bf16 inputs; odd sizes (1, 3, 17, 65, 130); outputs
// poisoned with NaN first; bad indices and NaN scores are named errors.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/moe.h"
#include "kernels/cuda/moe.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using namespace cuda_testing;  // tests/cuda/cuda_testing.h

::testing::AssertionResult close(const Tensor& gpu_tensor, const Tensor& expected, DType dtype) {
  return cuda_testing::close_to_reference(gpu_tensor, expected, dtype, 1e-5, 2e-6);
}

// cuBLASLt output (grouped linear): the GEMM parity test's bf16 tolerance (tests/cuda/gemm_test.cpp),
// fp32 outputs as above.
::testing::AssertionResult gemm_close(const Tensor& gpu_tensor, const Tensor& expected, DType dtype) {
  if (dtype != DType::bf16) return close(gpu_tensor, expected, dtype);
  return testing::tensors_close(gpu_tensor.to(Device::cpu()).to(DType::f32), expected, 8e-3,
                                2e-6 * std::max(1.0, max_abs(expected)));
}


TEST(CudaMoe, GatherAndDeterministicScatterAddMatchTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 600;
  for (DType dtype : {DType::bf16, DType::f32})
    for (auto [n, m, c] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {3, 17, 65}, {17, 130, 64}, {65, 3, 130},
                           {5, 1000, 17}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " N " << n << " M " << m << " C " << c);
      Tensor x = random_rounded({n, c}, seed++, dtype);
      Tensor index = testing::random_indices({m}, n, seed++);  // repeats when M > N, gaps when M < N
      Tensor gathered_ref = Tensor::empty({m, c});
      cpu::index_select_rows(gathered_ref, x, index, cpu_stream());
      Tensor ig = index.to(gpu());
      Tensor gathered = poisoned({m, c}, dtype);
      cuda::index_select_rows(gathered, x.to(dtype).to(gpu()), ig, gpu_stream());
      EXPECT_TENSOR_CLOSE(gathered.to(Device::cpu()).to(DType::f32), gathered_ref, 0, 0);

      Tensor rows = random_rounded({m, c}, seed++, dtype);
      Tensor base = random_rounded({n, c}, seed++, dtype);
      Tensor sum_ref = base.clone();
      cpu::index_add_rows(sum_ref, rows, index, cpu_stream());
      Tensor rows_g = rows.to(dtype).to(gpu());
      Tensor sum = base.to(dtype).to(gpu());
      cuda::index_add_rows(sum, rows_g, ig, gpu_stream());
      EXPECT_TRUE(close(sum, sum_ref, dtype)) << "index_add_rows";
      Tensor again = base.to(dtype).to(gpu());
      cuda::index_add_rows(again, rows_g, ig, gpu_stream());
      EXPECT_TENSOR_CLOSE(again.to(Device::cpu()).to(DType::f32), sum.to(Device::cpu()).to(DType::f32), 0, 0);
    }
}

TEST(CudaMoe, OutOfRangeIndicesAreNamed) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor x = Tensor::zeros({10, 4}, DType::bf16, gpu()), out = Tensor::zeros({4, 4}, DType::bf16, gpu());
  Tensor index = Tensor::from_vector<int64_t>({1, 2, 12, -1}, {4}).to(gpu());
  for (int op = 0; op < 2; ++op) {
    try {
      if (op == 0) cuda::index_select_rows(out, x, index, gpu_stream());
      else cuda::index_add_rows(x, out, index, gpu_stream());
      ADD_FAILURE() << "expected an error";
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find("index 12 at position 2"), std::string::npos) << msg;
      EXPECT_NE(msg.find("[0, 10)"), std::string::npos) << msg;
    }
  }
}

TEST(CudaMoe, LogSumExpMatchesTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 700;
  for (DType dtype : {DType::bf16, DType::f32})
    for (auto [n, k] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {17, 64}, {130, 65}, {2, 1000}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " N " << n << " K " << k);
      Tensor x = random_rounded({n, k}, seed++, dtype, 3.0);
      if (n > 2) {  // a row of -inf (empty) and one with a single finite entry
        float* p = x.data<float>();
        for (int64_t j = 0; j < k; ++j) p[j] = -INFINITY;
        for (int64_t j = 1; j < k; ++j) p[k + j] = -INFINITY;
      }
      Tensor lse_ref = Tensor::empty({n});
      cpu::logsumexp_forward(lse_ref, x, cpu_stream());
      Tensor grad = testing::random_tensor({n}, seed++, DType::f32);
      Tensor gx_ref = Tensor::empty({n, k});
      cpu::logsumexp_backward(gx_ref, grad, x, lse_ref, cpu_stream());
      Tensor xg = x.to(dtype).to(gpu());
      Tensor lse = poisoned({n}, DType::f32);
      cuda::logsumexp_forward(lse, xg, gpu_stream());
      // fp32 sums against the twin's double ones.
      EXPECT_TRUE(testing::tensors_close(lse.to(Device::cpu()), lse_ref, 1e-5, 1e-5)) << "lse";
      Tensor gx = poisoned({n, k}, dtype);
      cuda::logsumexp_backward(gx, grad.to(gpu()), xg, lse, gpu_stream());
      EXPECT_TRUE(close(gx, gx_ref, dtype)) << "grad_x";
    }
}

TEST(CudaMoe, TopkMatchesTheCpuTwinIncludingTies) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 800;
  for (DType dtype : {DType::bf16, DType::f32})
    for (auto [n, e, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {3, 8, 2}, {17, 64, 8}, {65, 65, 65},
                           {130, 130, 3}, {5, 7, 7}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " N " << n << " E " << e << " k " << k);
      // Scores on a coarse grid so that ties are frequent; -inf in a few places.
      Tensor scores = testing::random_indices({n, e}, 5, seed++).to(DType::f32);
      float* p = scores.data<float>();
      for (int64_t i = 0; i < n * e; i += 7) p[i] = -INFINITY;
      Tensor idx_ref = Tensor::empty({n, k}, DType::i64);
      cpu::topk_rows(idx_ref, scores, k, cpu_stream());
      Tensor idx = Tensor::full({n, k}, -7, DType::i64, gpu());
      cuda::topk_rows(idx, scores.to(dtype).to(gpu()), k, gpu_stream());
      EXPECT_EQ(idx.to(Device::cpu()).to_vector<int64_t>(), idx_ref.to_vector<int64_t>());
    }
  Tensor nan_scores = Tensor::from_vector<float>({1, 2, 3, 4, NAN, 6}, {2, 3}).to(gpu());
  Tensor idx = Tensor::zeros({2, 1}, DType::i64, gpu());
  try {
    cuda::topk_rows(idx, nan_scores, 1, gpu_stream());
    ADD_FAILURE() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("score (1, 1) is NaN"), std::string::npos) << err.what();
  }
}

// The MoH gate kernels (a thread per row) against the CPU twin (the same row
// functions, kernels/moh_gate_row.h; the device's expf and fused multiply-adds
// differ by a few roundings): f32 within 1e-5, f64 within 1e-13, with 0, 1 and 5
// shared heads; outputs start as NaN, so every element must be written.
TEST(CudaMoe, MohGateMatchesTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t n = 1000, e = 12, k = 4;
  for (DType dtype : {DType::f32, DType::f64})
    for (int64_t shared : {0, 1, 5}) {
      SCOPED_TRACE(::testing::Message() << dtype << " shared " << shared);
      const int64_t zc = shared > 0 ? (shared > 1 ? shared : 0) + 2 : 0;
      Tensor logits = testing::random_tensor({n, e}, 300 + shared, DType::f64);
      std::vector<double> pv = logits.to_vector<double>();
      for (int64_t i = 0; i < n; ++i) {  // rows of probabilities
        double sum = 0;
        for (int64_t j = 0; j < e; ++j) sum += (pv[i * e + j] = std::exp(pv[i * e + j]));
        for (int64_t j = 0; j < e; ++j) pv[i * e + j] /= sum;
      }
      Tensor p = Tensor::from_vector(pv, {n, e}).to(dtype);
      Tensor mask = Tensor::empty({n, e}, dtype);
      cpu::topk_mask_rows(mask, p, k, cpu_stream());
      Tensor z = shared > 0 ? testing::random_tensor({n, zc}, 400 + shared, DType::f64).to(dtype) : Tensor();
      Tensor dgate = testing::random_tensor({n, shared + e}, 500 + shared, DType::f64).to(dtype);
      Tensor gate_ref = Tensor::empty({n, shared + e}, dtype), dp_ref = Tensor::empty({n, e}, dtype);
      Tensor dz_ref = shared > 0 ? Tensor::empty({n, zc}, dtype) : Tensor();
      cpu::moh_gate_rows(gate_ref, p, mask, z, shared, k, cpu_stream());
      cpu::moh_gate_rows_backward(dp_ref, dz_ref, dgate, p, mask, z, shared, k, cpu_stream());
      Tensor pg = p.to(gpu()), mg = mask.to(gpu()), zg = shared > 0 ? z.to(gpu()) : Tensor();
      Tensor gate = Tensor::full({n, shared + e}, NAN, dtype, gpu()), dp = Tensor::full({n, e}, NAN, dtype, gpu());
      Tensor dz = shared > 0 ? Tensor::full({n, zc}, NAN, dtype, gpu()) : Tensor();
      cuda::moh_gate_rows(gate, pg, mg, zg, shared, k, gpu_stream());
      cuda::moh_gate_rows_backward(dp, dz, dgate.to(gpu()), pg, mg, zg, shared, k, gpu_stream());
      const double tol = dtype == DType::f32 ? 1e-5 : 1e-13;
      EXPECT_TENSOR_CLOSE(gate.to(Device::cpu()), gate_ref, tol, tol) << "gate";
      EXPECT_TENSOR_CLOSE(dp.to(Device::cpu()), dp_ref, tol, tol) << "dp";
      if (shared > 0) {
        EXPECT_TENSOR_CLOSE(dz.to(Device::cpu()), dz_ref, tol, tol) << "dz";
      }
    }
}

TEST(CudaMoe, TopkMaskMatchesTheCpuTwinIncludingTiesAndNans) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 900;
  for (DType dtype : {DType::bf16, DType::f32})
    for (auto [n, e, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {3, 8, 2}, {17, 64, 8}, {65, 65, 65},
                           {130, 130, 3}, {5, 7, 7}, {4096, 12, 8}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " N " << n << " E " << e << " k " << k);
      // A coarse grid (frequent ties), -inf in some places and NaN in others.
      Tensor scores = testing::random_indices({n, e}, 5, seed++).to(DType::f32);
      float* p = scores.data<float>();
      for (int64_t i = 0; i < n * e; i += 7) p[i] = -INFINITY;
      for (int64_t i = 3; i < n * e; i += 11) p[i] = NAN;
      Tensor ref = Tensor::empty({n, e}, DType::f32);  // the grid is exact in bf16: one reference
      cpu::topk_mask_rows(ref, scores, k, cpu_stream());
      Tensor mask = Tensor::full({n, e}, -7, dtype, gpu());
      cuda::topk_mask_rows(mask, scores.to(dtype).to(gpu()), k, gpu_stream());
      const std::vector<double> got = mask.to(Device::cpu()).to_vector<double>(), want = ref.to_vector<double>();
      EXPECT_EQ(got, want);
      for (int64_t i = 0; i < n; ++i) {  // k marks per row
        double marks = 0;
        for (int64_t j = 0; j < e; ++j) marks += got[static_cast<size_t>(i * e + j)];
        ASSERT_EQ(marks, static_cast<double>(k)) << "row " << i;
      }
    }
}

TEST(CudaMoe, GroupedLinearMatchesTheCpuTwinWithEmptyExperts) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 900;
  const int64_t E = 5, in = 65, out = 17;
  // Rows per expert: empty groups first, in the middle and last.
  const std::vector<int64_t> offsets{0, 0, 3, 3, 133, 133};
  const int64_t S = offsets.back();
  for (DType dtype : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(::testing::Message() << dtype);
    Tensor x = random_rounded({S, in}, seed++, dtype), w = random_rounded({E, out, in}, seed++, dtype, 0.3);
    Tensor gy = random_rounded({S, out}, seed++, dtype);
    Tensor y_ref = Tensor::empty({S, out}), gx_ref = Tensor::empty({S, in}), gw_ref = Tensor::empty({E, out, in});
    cpu::grouped_linear_forward(y_ref, x, w, offsets, cpu_stream());
    cpu::grouped_linear_backward(gx_ref, gw_ref, gy, x, w, offsets, cpu_stream());
    Tensor xg = x.to(dtype).to(gpu()), wg = w.to(dtype).to(gpu()), gyg = gy.to(dtype).to(gpu());
    Tensor y = poisoned({S, out}, dtype);
    cuda::grouped_linear_forward(y, xg, wg, offsets, gpu_stream());
    EXPECT_TRUE(gemm_close(y, y_ref, dtype)) << "y";
    for (DType grad_dtype : {dtype, DType::f32}) {
      Tensor gx = poisoned({S, in}, grad_dtype), gw = poisoned({E, out, in}, grad_dtype);
      cuda::grouped_linear_backward(gx, gw, gyg, xg, wg, offsets, gpu_stream());
      EXPECT_TRUE(gemm_close(gx, gx_ref, grad_dtype)) << "grad_x " << grad_dtype;
      EXPECT_TRUE(gemm_close(gw, gw_ref, grad_dtype)) << "grad_w " << grad_dtype;
    }
    Tensor only_w = poisoned({E, out, in}, DType::f32), no_x;
    cuda::grouped_linear_backward(no_x, only_w, gyg, xg, wg, offsets, gpu_stream());
    EXPECT_TRUE(gemm_close(only_w, gw_ref, DType::f32)) << "grad_w alone";
  }
  Tensor x = Tensor::zeros({4, 3}, DType::bf16, gpu()), w = Tensor::zeros({2, 5, 3}, DType::bf16, gpu());
  Tensor y = Tensor::zeros({4, 5}, DType::bf16, gpu());
  try {
    cuda::grouped_linear_forward(y, x, w, {0, 3, 2}, gpu_stream());
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 offsets"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loom
