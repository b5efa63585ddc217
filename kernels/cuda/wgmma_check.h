// The warpgroup products of wgmma.cuh, one per operand form the kernels use,
// on a single 64-row tile: the tests check the tile layout, descriptors and
// fragment layouts here against host products before any kernel relies on them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

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

// TMA copies (tma.h, tma.cuh) as the kernels would issue them: rows t0 .. t0 + 63 of head h, batch
// b, of a contiguous bf16 (batch, seq, heads, dim) tensor (dim 64 or 128) into a panel tile, whose
// shared-memory image (64 x dim elements) is written to out. The tests compare it with the layout
// built on the host.
void launch_tma_rows_check(void* out, const void* rows, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
                           int64_t b, int64_t t0, int64_t h, cudaStream_t stream);

}  // namespace loom::cuda::detail
