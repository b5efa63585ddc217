// Shared-memory barriers with transaction counts (mbarrier) and tile copies
// through the tensor memory accelerator (TMA, sm_90; maps from tma.h).
//
// An mbarrier completes a phase when its arrival count is reached and, with
// expect_tx, the bytes announced have landed: a producer thread announces a
// stage's bytes with arrive_expect_tx, issues the copies that complete them,
// and consumers wait for the phase's parity. A fresh barrier counts its phase
// of parity 1 as complete, so a producer's first wait on an "empty" barrier
// passes.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "kernels/cuda/mma.cuh"

namespace loom::cuda::tma {

using mma::smem_addr;

// init (one thread, before a block barrier): `count` arrivals per phase.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// After the inits, before the block barrier that publishes them: makes them visible to the
// async proxy (the TMA engine completes transactions on them).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// This thread's arrival (release).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar))
               : "memory");
}
// This thread's arrival, announcing `bytes` more to land in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
                   smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
// Announces `bytes` more to land in this phase, without an arrival.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Waits until the phase of the given parity has completed (acquire).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Copies the tile of `map` at coordinates (c0 innermost .. c3) to dst (shared memory; 1024-byte
// aligned for the 128-byte swizzle), completing its bytes on bar.
__device__ __forceinline__ void load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                        uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}

// Rows t0 .. t0 + kRows - 1 of head h, batch b, of a rows_tensor_map (box kRows rows) into a panel
// tile of kRows rows x kD (wgmma.cuh): one copy per 64-column panel. Returns the bytes announced.
template <int kD, int kRows>
__device__ __forceinline__ uint32_t load_rows(__nv_bfloat16* tile, const CUtensorMap* map, int64_t b, int64_t t0,
                                              int64_t h, uint64_t* bar) {
#pragma unroll
  for (int p = 0; p < kD / 64; ++p)
    load_4d(tile + p * kRows * 64, map, 64 * p, static_cast<int>(h), static_cast<int>(t0), static_cast<int>(b), bar);
  return kRows * kD * 2;
}

// Bulk reduction (sm_90): adds `bytes` (a multiple of 16) of fp32 from shared memory src into
// global memory dst (both 16-byte aligned) asynchronously, in L2, as one operation of this thread's
// current bulk group. Shared-memory writes the copy reads must precede it in the async proxy
// (wgmma.cuh's fence_smem by each writing thread, then a barrier).
__device__ __forceinline__ void bulk_reduce_add(float* dst, const float* src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(smem_addr(src)), "r"(bytes)
               : "memory");
}
// Closes this thread's bulk group; waits until at most kPending of its groups have not finished
// reading their shared memory (read_wait) or have not completed (wait).
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void bulk_read_wait() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Barrier `id` (1..15; __syncthreads is 0) over `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace loom::cuda::tma
