// Tensor maps for Hopper's tensor memory accelerator (TMA): descriptors, made on
// the host, that let one thread copy a whole tile between global and shared
// memory (kernels/cuda/tma.cuh). Kernels take them as __grid_constant__
// parameters.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace loom::cuda::detail {

// A map over a bf16 tensor of rows (batch, seq, heads, dim), contiguous, whose tiles are one head's
// `box_rows` consecutive rows by 64 columns, written to shared memory as one 64-column panel of
// wgmma.cuh's panel tiles (the 128-byte swizzle): a tile of `box_rows` rows x dim is dim / 64
// copies. Rows past `seq` arrive as zeros. base 16-byte aligned; dim a multiple of 64.
CUtensorMap rows_tensor_map(const void* base, int64_t batch, int64_t seq, int64_t heads, int64_t dim, int box_rows);

}  // namespace loom::cuda::detail
