// The warpgroup products of wgmma.cuh, one per operand form the kernels use,
// on a single 64-row tile: the tests check the tile layout, descriptors and
// fragment layouts here against host products before any kernel relies on them.
#pragma once

#include <cuda_runtime_api.h>

namespace loom::cuda::detail {

// True when this build has sm_90a code and the current device is a compute capability 9.0 GPU
// (the warpgroup products' kernels can run there).
bool wgmma_available();

// Operands are bf16, row-major as stored in global memory; c is 64 x N fp32, row-major.
enum class WgmmaCheck {
  ss_k_major,    // a (64 x 128) [m][k], b (64 x 128) [n][k]: c (64 x 64) = a b^T (both K-major)
  rs_n_major128, // a (64 x 64) [m][k] in registers, b (64 x 128) [k][n]: c (64 x 128) = a b
  rs_n_major64,  // a (64 x 64) [m][k] in registers, b (64 x 64) [k][n]: c (64 x 64) = a b
  ss_m_major,    // a (128 x 64) [k][m], b (128 x 128) [k][n]: c (64 x 64) = a^T b[:, 64:128]
};

void launch_wgmma_check(WgmmaCheck which, float* c, const void* a, const void* b, cudaStream_t stream);

}  // namespace loom::cuda::detail
