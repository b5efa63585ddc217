// The exact partial-attention merge (ALGORITHMS.md §1): the CPU twin against
// attention over the concatenated keys (runs everywhere), and the CUDA kernel
// against the CPU twin on the same inputs (skips without a GPU): B 1 and 2,
// accumulator rows 1, 3, 17, 65, merged ranges at offsets, H 1 and 3, D 1, 3,
// 17, 65, 128; rows empty in the accumulator, in the partial or in both;
// partials in f32 and bf16 (rounded first, so both sides see the same
// numbers). Rows outside the merged range are NaN before and must stay NaN;
// rows inside must come out finite.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_merge.h"
#include "kernels/cuda/attention_merge.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using cuda_testing::cpu_stream;
using cuda_testing::gpu;
using cuda_testing::gpu_stream;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// (B, H, n) log-sum-exps in [-3, 3], with about a fifth of them -inf (empty rows).
Tensor random_lse(const Shape& shape, uint64_t seed) {
  Tensor t = testing::random_tensor(shape, seed, DType::f32, 1.5);
  std::mt19937_64 rng(seed + 99);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (rng() % 5 == 0) p[i] = -std::numeric_limits<float>::infinity();
  return t;
}

// Two attention calls over a split key set, merged, equal one call over all keys.
TEST(AttentionMerge, CpuMergeOfTwoKeyBlocksEqualsAttentionOverAllKeys) {
  for (DType dtype : {DType::f64, DType::f32}) {
    const int64_t B = 2, T = 17, S = 65, H = 3, D = 5, split = 23;
    Tensor q = testing::random_tensor({B, T, H, D}, 1, dtype), k = testing::random_tensor({B, S, H, D}, 2, dtype);
    Tensor v = testing::random_tensor({B, S, H, D}, 3, dtype);
    Tensor qp = Tensor::arange(T, DType::i64), kp = Tensor::arange(S, DType::i64);
    for (int64_t i = 0; i < T; ++i) qp.data<int64_t>()[i] = 3 * i;  // causal: query i sees keys 0..3i
    const double scale = 0.4;
    Tensor out_all = Tensor::empty({B, T, H, D}, dtype), lse_all = Tensor::empty({B, H, T}, dtype);
    cpu::attention_forward(out_all, lse_all, q, k, v, qp, kp, scale, true, S2Pattern{}, cpu_stream());

    // Accumulator starts empty; merge the later keys first, then the earlier ones.
    Tensor out = Tensor::full({B, T, H, D}, NAN, dtype), lse = Tensor::full({B, H, T}, kNegInf, dtype);
    const int64_t ranges[2][2] = {{split, S - split}, {0, split}};
    for (const auto& r : ranges) {
      Tensor kb = k.narrow(1, r[0], r[1]).contiguous(), vb = v.narrow(1, r[0], r[1]).contiguous();
      Tensor part = Tensor::empty({B, T, H, D}, dtype), part_lse = Tensor::empty({B, H, T}, dtype);
      cpu::attention_forward(part, part_lse, q, kb, vb, qp, kp.narrow(0, r[0], r[1]).contiguous(), scale, true,
                             S2Pattern{}, cpu_stream());
      // Merged in two row ranges, to exercise row_start.
      for (auto [start, len] : {std::pair<int64_t, int64_t>{0, 6}, {6, T - 6}}) {
        Tensor po = part.narrow(1, start, len).contiguous(), pl = part_lse.narrow(2, start, len).contiguous();
        cpu::attention_merge(out, lse, po, pl, start, cpu_stream());
      }
    }
    const double tol = dtype == DType::f64 ? 1e-13 : 2e-6;
    EXPECT_TENSOR_CLOSE(out, out_all, tol, tol);
    EXPECT_TENSOR_CLOSE(lse, lse_all, tol, tol);
  }
}

TEST(AttentionMerge, CpuMergeKeepsEmptyRowsEmptyAndNeverMakesNaN) {
  Tensor out = Tensor::zeros({1, 2, 1, 3}), lse = Tensor::full({1, 1, 2}, kNegInf);
  Tensor part = Tensor::full({1, 2, 1, 3}, NAN), part_lse = Tensor::full({1, 1, 2}, kNegInf);
  cpu::attention_merge(out, lse, part, part_lse, 0, cpu_stream());  // (-inf, -inf): still empty, partial ignored
  EXPECT_TENSOR_CLOSE(out, Tensor::zeros({1, 2, 1, 3}), 0, 0);
  EXPECT_EQ(lse.data<float>()[0], -std::numeric_limits<float>::infinity());
  // Equal finite lse: weights 1/2 each, lse + log 2.
  Tensor a = Tensor::full({1, 1, 1, 3}, 2.0), al = Tensor::full({1, 1, 1}, 0.5);
  Tensor b = Tensor::full({1, 1, 1, 3}, 4.0), bl = Tensor::full({1, 1, 1}, 0.5);
  cpu::attention_merge(a, al, b, bl, 0, cpu_stream());
  EXPECT_TENSOR_CLOSE(a, Tensor::full({1, 1, 1, 3}, 3.0), 1e-7, 0);
  EXPECT_NEAR(al.data<float>()[0], 0.5 + std::log(2.0), 1e-6);
}

TEST(AttentionMerge, ErrorsNameTheValues) {
  Tensor out = Tensor::zeros({1, 4, 2, 3}), lse = Tensor::zeros({1, 2, 4});
  Tensor part = Tensor::zeros({1, 3, 2, 3}), part_lse = Tensor::zeros({1, 2, 3});
  try {
    cpu::attention_merge(out, lse, part, part_lse, 2, cpu_stream());
    ADD_FAILURE() << "rows past the end were accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("rows [2, 5)"), std::string::npos) << e.what();
  }
  Tensor wrong = Tensor::zeros({1, 3, 2, 3}, DType::f64);
  EXPECT_THROW(cpu::attention_merge(out, lse, wrong, part_lse, 0, cpu_stream()), std::exception);
}

void check_cuda_case(int64_t B, int64_t N, int64_t start, int64_t n, int64_t H, int64_t D, DType part_dtype,
                     uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "B " << B << " N " << N << " rows [" << start << ", " << start + n << ") H "
                                    << H << " D " << D << " partial " << part_dtype);
  // The accumulator's rows outside [start, start + n) are NaN: they must stay so.
  Tensor acc = Tensor::full({B, N, H, D}, NAN, DType::f32), acc_lse = Tensor::full({B, H, N}, NAN, DType::f32);
  acc.narrow(1, start, n).copy_(testing::random_tensor({B, n, H, D}, seed, DType::f32));
  acc_lse.narrow(2, start, n).copy_(random_lse({B, H, n}, seed + 1));
  Tensor part = testing::random_tensor({B, n, H, D}, seed + 2, DType::f32).to(part_dtype).to(DType::f32);
  Tensor part_lse = random_lse({B, H, n}, seed + 3);

  Tensor out_gpu = acc.to(gpu()), lse_gpu = acc_lse.to(gpu());
  Tensor part_gpu = part.to(part_dtype).to(gpu()), part_lse_gpu = part_lse.to(gpu());
  cuda::attention_merge(out_gpu, lse_gpu, part_gpu, part_lse_gpu, start, gpu_stream());
  cpu::attention_merge(acc, acc_lse, part, part_lse, start, cpu_stream());
  Tensor out_host = out_gpu.to(Device::cpu()), lse_host = lse_gpu.to(Device::cpu());

  // tensors_close fails on NaN, so the untouched NaN rows are checked apart.
  auto all_nan = [](const Tensor& t) {
    for (double x : t.to_vector<double>())
      if (!std::isnan(x)) return false;
    return true;
  };
  if (start > 0) {
    EXPECT_TRUE(all_nan(out_host.narrow(1, 0, start).contiguous())) << "rows before the range were written";
    EXPECT_TRUE(all_nan(lse_host.narrow(2, 0, start).contiguous()));
  }
  if (start + n < N) {
    EXPECT_TRUE(all_nan(out_host.narrow(1, start + n, N - start - n).contiguous())) << "rows after the range";
    EXPECT_TRUE(all_nan(lse_host.narrow(2, start + n, N - start - n).contiguous()));
  }
  EXPECT_TENSOR_CLOSE(out_host.narrow(1, start, n).contiguous(), acc.narrow(1, start, n).contiguous(), 2e-6, 1e-6);
  // -inf rows compare equal; finite ones to a few fp32 ulp.
  EXPECT_TENSOR_CLOSE(lse_host.narrow(2, start, n).contiguous(), acc_lse.narrow(2, start, n).contiguous(), 2e-6,
                      1e-6);
}

TEST(AttentionMerge, CudaMatchesTheCpuTwin) {
  LOOM_SKIP_WITHOUT_GPU();
  uint64_t seed = 100;
  for (DType part_dtype : {DType::f32, DType::bf16})
    for (int64_t B : {1, 2})
      for (int64_t N : {1, 3, 17, 65})
        for (int64_t D : {1, 3, 17, 65, 128})
          for (int64_t H : {1, 3}) {
            check_cuda_case(B, N, 0, N, H, D, part_dtype, seed);  // the whole accumulator
            if (N > 2) check_cuda_case(B, N, N / 3, N - N / 3 - 1, H, D, part_dtype, seed + 5);  // an inner range
            seed += 10;
          }
}

TEST(AttentionMerge, CudaRejectsNon32BitStatistics) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor out = Tensor::zeros({1, 3, 2, 4}, DType::bf16, gpu()), lse = Tensor::zeros({1, 2, 3}, DType::f32, gpu());
  Tensor part = Tensor::zeros({1, 3, 2, 4}, DType::bf16, gpu()), part_lse = Tensor::zeros({1, 2, 3}, DType::f32, gpu());
  try {
    cuda::attention_merge(out, lse, part, part_lse, 0, gpu_stream());
    ADD_FAILURE() << "a bf16 accumulator was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("must be f32"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loom
