// One warpgroup computes the WgmmaCheck products (wgmma_check.h) through
// wgmma.cuh: operands copied into panel tiles, register A fragments built as
// the attention kernels build them (C fragments packed to bf16).
#include "kernels/cuda/wgmma_check.h"

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/tma.cuh"
#include "kernels/cuda/tma.h"
#include "kernels/cuda/wgmma.cuh"

#include <atomic>

namespace loom::cuda::detail {

namespace {

using bf16 = __nv_bfloat16;

// dst (panel tile of `rows` rows, `cols` columns) <- src (row-major, same shape).
__device__ void to_panels(bf16* dst, const bf16* src, int rows, int cols) {
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x)
    dst[wgmma::panel_index(e / cols, e % cols, rows)] = src[e];
}

// This thread's A fragments (m16n8k16 layout, warp w -> rows 16 w..) of a (64 x 64) [m][k].
__device__ void a_fragments(uint32_t (&f)[4][4], const bf16* a) {
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  auto pair = [&](int r, int c) {
    __nv_bfloat162 v;
    v.x = a[r * 64 + c];
    v.y = a[r * 64 + c + 1];
    return mma::pack_bf16(v);
  };
  for (int kk = 0; kk < 4; ++kk) {
    const int r = 16 * warp + g, c = 16 * kk + 2 * t;
    f[kk][0] = pair(r, c);
    f[kk][1] = pair(r + 8, c);
    f[kk][2] = pair(r, c + 8);
    f[kk][3] = pair(r + 8, c + 8);
  }
}

template <int kN>
__device__ void store_c(float* c, const float (&d)[kN / 8][4]) {
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  for (int i = 0; i < kN / 8; ++i)
    for (int e = 0; e < 4; ++e) c[(16 * warp + g + 8 * (e / 2)) * kN + 8 * i + 2 * t + e % 2] = d[i][e];
}

__global__ void __launch_bounds__(128) wgmma_check_kernel(WgmmaCheck which, float* c, const bf16* a, const bf16* b) {
#if defined(LOOM_WGMMA)
  __shared__ __align__(1024) bf16 as[64 * 128];  // the largest a (128 x 64 or 64 x 128)
  __shared__ __align__(1024) bf16 bs[128 * 128];
  const int a_rows = which == WgmmaCheck::ss_m_major ? 128 : 64;
  const int a_cols = which == WgmmaCheck::ss_k_major ? 128 : 64;
  const int b_rows = which == WgmmaCheck::ss_m_major ? 128 : 64;
  const int b_cols = which == WgmmaCheck::rs_n_major64 ? 64 : 128;
  to_panels(as, a, a_rows, a_cols);
  to_panels(bs, b, b_rows, b_cols);
  wgmma::fence_smem();
  __syncthreads();
  if (which == WgmmaCheck::rs_n_major128) {
    float d[16][4] = {};
    uint32_t f[4][4];
    a_fragments(f, a);
    wgmma::pin(d);
    wgmma::pin(f);
    wgmma::fence();
    for (int kk = 0; kk < 4; ++kk) wgmma::wgmma_rs_n128<1>(d, f[kk], wgmma::mnmajor(bs, 64, 16 * kk));
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::pin(d);
    store_c<128>(c, d);
    return;
  }
  // NaN to start: the first product of each batch runs with accumulate 0, which must ignore them.
  float d[8][4];
  for (auto& row : d)
    for (float& x : row) x = __int_as_float(0x7fc00000);
  wgmma::pin(d);
  if (which == WgmmaCheck::rs_n_major64) {
    uint32_t f[4][4];
    a_fragments(f, a);
    wgmma::pin(f);
    wgmma::fence();
    for (int kk = 0; kk < 4; ++kk) wgmma::wgmma_rs_n64<1>(d, f[kk], wgmma::mnmajor(bs, 64, 16 * kk), kk > 0);
  } else if (which == WgmmaCheck::ss_k_major) {
    wgmma::fence();
    for (int kk = 0; kk < 8; ++kk)
      wgmma::wgmma_ss_n64<0, 0>(d, wgmma::kmajor(as, 64, 0, 16 * kk), wgmma::kmajor(bs, 64, 0, 16 * kk), kk > 0);
  } else {
    wgmma::fence();
    for (int kk = 0; kk < 8; ++kk)
      wgmma::wgmma_ss_n64<1, 1>(d, wgmma::mnmajor(as, 128, 16 * kk), wgmma::mnmajor(bs, 128, 16 * kk, 1), kk > 0);
  }
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::pin(d);
  store_c<64>(c, d);
#else
  __trap();
#endif
}

// One thread announces and issues the copies, every thread waits for them, then copies the image
// out.
template <int kD>
__global__ void __launch_bounds__(32) tma_check_kernel(const __grid_constant__ CUtensorMap map, void* out,
                                                       int64_t b, int64_t t0, int64_t h) {
#if defined(LOOM_WGMMA)
  __shared__ __align__(1024) bf16 tile[64 * kD];
  __shared__ uint64_t bar;
  if (threadIdx.x == 0) {
    tma::mbar_init(&bar, 1);
    tma::mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tma::mbar_arrive_expect_tx(&bar, 64 * kD * 2);
    tma::load_rows<kD, 64>(tile, &map, b, t0, h, &bar);
  }
  tma::mbar_wait(&bar, 0);
  for (int e = threadIdx.x; e < 64 * kD; e += 32) static_cast<bf16*>(out)[e] = tile[e];
#else
  __trap();
#endif
}

}  // namespace

bool wgmma_available() {
#if defined(LOOM_CUDA_SM90A)
  // Per device (a host may mix GPUs): 0 unknown, 1 no, 2 yes; asked once each.
  static std::atomic<int> known[64] = {};
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return false;
  if (device < 64 && known[device].load() != 0) return known[device].load() == 2;
  const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                   cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
                   major == 9 && minor == 0;
  if (device < 64) known[device].store(yes ? 2 : 1);
  return yes;
#else
  return false;
#endif
}

void launch_wgmma_check(WgmmaCheck which, float* c, const void* a, const void* b, cudaStream_t stream) {
  LOOM_CHECK(wgmma_available()) << "wgmma check: this build has no sm_90a code or the device is not sm_90";
  wgmma_check_kernel<<<1, 128, 0, stream>>>(which, c, static_cast<const bf16*>(a), static_cast<const bf16*>(b));
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void launch_tma_rows_check(void* out, const void* rows, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
                           int64_t b, int64_t t0, int64_t h, cudaStream_t stream) {
  LOOM_CHECK(wgmma_available()) << "tma check: this build has no sm_90a code or the device is not sm_90";
  LOOM_CHECK(dim == 64 || dim == 128) << "tma check: dim " << dim << " (64 or 128)";
  const CUtensorMap map = rows_tensor_map(rows, batch, seq, heads, dim, 64);
  if (dim == 64) tma_check_kernel<64><<<1, 32, 0, stream>>>(map, out, b, t0, h);
  else tma_check_kernel<128><<<1, 32, 0, stream>>>(map, out, b, t0, h);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::cuda::detail
