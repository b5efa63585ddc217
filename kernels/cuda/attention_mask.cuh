// The attention visibility rule (attention_launch.h's AttentionMask) on device,
// shared by the interim kernels (attention.cu) and the flash kernels
// (flash_common.cuh), which keep positions in different shared-memory layouts.
#pragma once

#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/key_blocks.h"  // div_pos, mod_pos

#include <cstdint>

namespace loom::cuda::detail {

// Whether S2 key block J is on kv head hk's strided shard.
__host__ __device__ __forceinline__ bool s2_strided(const AttentionMask& m, int64_t J, int64_t hk) {
  return mod_pos(J + hk * m.s2_offset, m.s2_stride) == 0;
}

// The CPU twin's rule for a query at position qp and a key at kp, given their S2 block ids
// (I, J) and whether J is strided (both unused without S2).
__device__ __forceinline__ bool pair_visible(const AttentionMask& m, int64_t qp, int64_t kp, int64_t I, int64_t J,
                                             bool strided) {
  if (m.causal && kp > qp) return false;
  if (m.s2_block > 0) {
    if (J > I) return false;
    return I - J < m.s2_local || strided;
  }
  return true;
}

}  // namespace loom::cuda::detail
