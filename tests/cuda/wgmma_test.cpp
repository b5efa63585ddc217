// The warpgroup products (kernels/cuda/wgmma.cuh) in every operand form the
// attention kernels use (wgmma_check.h), on random bf16 tiles against f64
// host products. A wrong tile layout, descriptor offset or fragment layout
// moves whole rows or columns (errors of the order of the values); the bound
// is the fp32 accumulation's: 2^-18 of each element's sum of |a b| (the
// products are exact in fp32; tensor cores add them with fp32 accumulators,
// not always in round-to-nearest order, so a few roundings of 2^-24 each).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/cuda/wgmma_check.h"
#include "tests/cuda/cuda_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using cuda::detail::WgmmaCheck;
using cuda_testing::gpu;
using cuda_testing::gpu_stream;

struct Case {
  WgmmaCheck which;
  const char* name;
  int a_rows, a_cols, b_rows, b_cols, n;
};

// c[m][n] and sum |a b| on the host from the stored operands (see wgmma_check.h).
void host_product(const Case& k, const std::vector<double>& a, const std::vector<double>& b, std::vector<double>& c,
                  std::vector<double>& mag) {
  c.assign(static_cast<size_t>(64 * k.n), 0.0);
  mag = c;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < k.n; ++n) {
      double s = 0, t = 0;
      const int depth = k.which == WgmmaCheck::ss_m_major ? 128 : k.a_cols;
      for (int kk = 0; kk < depth; ++kk) {
        double x = 0, y = 0;
        switch (k.which) {
          case WgmmaCheck::ss_k_major: x = a[m * 128 + kk], y = b[n * 128 + kk]; break;
          case WgmmaCheck::rs_n_major128:
          case WgmmaCheck::rs_n_major64: x = a[m * 64 + kk], y = b[kk * k.b_cols + n]; break;
          case WgmmaCheck::ss_m_major: x = a[kk * 64 + m], y = b[kk * 128 + 64 + n]; break;
        }
        s += x * y;
        t += std::fabs(x * y);
      }
      c[m * k.n + n] = s;
      mag[m * k.n + n] = t;
    }
}

TEST(CudaWgmma, EveryOperandFormMatchesTheHostProduct) {
  LOOM_SKIP_WITHOUT_GPU();
  if (!cuda::detail::wgmma_available()) GTEST_SKIP() << "no sm_90a code in this build or the GPU is not sm_90";
  const Case cases[] = {
      {WgmmaCheck::ss_k_major, "ss_k_major", 64, 128, 64, 128, 64},
      {WgmmaCheck::rs_n_major128, "rs_n_major128", 64, 64, 64, 128, 128},
      {WgmmaCheck::rs_n_major64, "rs_n_major64", 64, 64, 64, 64, 64},
      {WgmmaCheck::ss_m_major, "ss_m_major", 128, 64, 128, 128, 64},
  };
  uint64_t seed = 900;
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    Tensor a = testing::random_tensor({k.a_rows, k.a_cols}, ++seed, DType::f32).to(DType::bf16);
    Tensor b = testing::random_tensor({k.b_rows, k.b_cols}, ++seed, DType::f32).to(DType::bf16);
    Tensor ag = a.to(gpu()), bg = b.to(gpu());
    Tensor cg = Tensor::empty({64, k.n}, DType::f32, gpu());
    cuda::detail::launch_wgmma_check(k.which, cg.data<float>(), ag.raw_data(), bg.raw_data(),
                                     static_cast<cudaStream_t>(gpu_stream().handle()));
    const std::vector<double> c = cg.to(Device::cpu()).to_vector<double>();
    std::vector<double> ref, mag;
    host_product(k, a.to(DType::f64).to_vector<double>(), b.to(DType::f64).to_vector<double>(), ref, mag);
    int bad = 0;
    for (size_t i = 0; i < ref.size() && bad < 5; ++i)
      if (!(std::fabs(c[i] - ref[i]) <= std::ldexp(mag[i], -18) + 1e-30)) {
        // Where the value belongs, if anywhere: a misplaced row or column shows as a permutation.
        std::string found = "nowhere in the reference";
        for (size_t j = 0; j < ref.size(); ++j)
          if (std::fabs(c[i] - ref[j]) <= std::ldexp(mag[j], -18) + 1e-30) {
            found = "at [" + std::to_string(j / k.n) + "][" + std::to_string(j % k.n) + "] of the reference";
            break;
          }
        ADD_FAILURE() << "c[" << i / k.n << "][" << i % k.n << "] = " << c[i] << ", expected " << ref[i]
                      << "; the value is " << found;
        ++bad;
      }
  }
}

// TMA tiles (kernels/cuda/tma.h, tma.cuh): the shared-memory image of rows copied through a tensor
// map must be wgmma.cuh's panel tile of those rows, stated here on its own: element (r, c) at
// (c / 64) 64 R + 64 r + 8 ((c % 64) / 8 ^ r % 8) + c % 8, rows past the sequence zero. Bits are
// compared exactly (a copy).
TEST(CudaWgmma, TmaRowTilesAreThePanelLayout) {
  LOOM_SKIP_WITHOUT_GPU();
  if (!cuda::detail::wgmma_available()) GTEST_SKIP() << "no sm_90a code in this build or the GPU is not sm_90";
  const int64_t B = 2, T = 100, H = 3;
  struct Tile {
    int64_t dim, b, t0, h;
  };
  const Tile tiles[] = {{128, 0, 0, 0}, {128, 1, 64, 2}, {64, 1, 36, 1}, {64, 0, 64, 0}};
  uint64_t seed = 950;
  for (const Tile& k : tiles) {
    SCOPED_TRACE("dim " + std::to_string(k.dim) + ", b " + std::to_string(k.b) + ", t0 " + std::to_string(k.t0) +
                 ", h " + std::to_string(k.h));
    Tensor x = testing::random_tensor({B, T, H, k.dim}, ++seed, DType::f32).to(DType::bf16);
    Tensor out = Tensor::empty({64, k.dim}, DType::bf16, gpu());
    cuda::detail::launch_tma_rows_check(out.raw_data(), x.to(gpu()).raw_data(), B, T, H, k.dim, k.b, k.t0, k.h,
                                        static_cast<cudaStream_t>(gpu_stream().handle()));
    const Tensor got = out.to(Device::cpu());
    const uint16_t* image = static_cast<const uint16_t*>(got.raw_data());
    const uint16_t* src = static_cast<const uint16_t*>(x.raw_data());
    int bad = 0;
    for (int64_t r = 0; r < 64; ++r)
      for (int64_t c = 0; c < k.dim && bad < 5; ++c) {
        const int64_t at = (c / 64) * 64 * 64 + 64 * r + 8 * (((c % 64) / 8) ^ (r % 8)) + c % 8;
        const int64_t t = k.t0 + r;
        const uint16_t want = t < T ? src[((k.b * T + t) * H + k.h) * k.dim + c] : 0;
        if (image[at] != want) {
          ADD_FAILURE() << "row " << r << ", column " << c << ": bits " << image[at] << ", expected " << want;
          ++bad;
        }
      }
  }
}

}  // namespace
}  // namespace loom
