// Warpgroup tensor-core products (wgmma, sm_90a) for the bf16 kernels: the
// shared-memory tile layout they read, its matrix descriptors, the product
// instructions used by flash attention, and the fences around them.
//
// Tile layout ("panels"): a tile of R rows (R a multiple of 8) and C columns
// (C a multiple of 64) of bf16 is stored as C / 64 panels of R rows x 128
// bytes, each row's eight 16-byte chunks permuted by chunk ^ (row % 8) (the
// 128-byte swizzle). Element (r, c) sits at
//   (c / 64) R 64 + r 64 + ((c % 64) / 8 ^ r % 8) 8 + c % 8
// elements from the tile base, which is 1024-byte aligned. The same tile
// serves as either operand major-ness:
//   K-major (rows are M or N, columns are K): the product's 16 k columns at
//     column c0 start at panel c0 / 64, byte 2 (c0 % 64) of row 0; 8-row
//     groups 1024 bytes apart (SBO); LBO unused.
//   MN-major (rows are K, columns are M or N): its 16 k rows at row k0 start
//     at byte 128 k0 of the panel; 8-row groups 1024 bytes apart (SBO),
//     64-column panels 128 R bytes apart (LBO).
// Accumulators (m64nN, fp32) and register A operands use the m16n8k16
// fragment layouts of mma.cuh per warp: warp w of the group holds rows
// 16 w .. 16 w + 15, d[i][0..3] = C fragment of n columns 8 i .. 8 i + 7.
// Everything here compiles to nothing useful below sm_90a: callers check
// wgmma_available() on the host and guard device code with LOOM_WGMMA.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LOOM_WGMMA 1
#endif

namespace loom::cuda::wgmma {

// Element offset of (r, c) in a panel tile of `rows` rows.
__host__ __device__ constexpr int panel_index(int r, int c, int rows) {
  return (c / 64) * rows * 64 + r * 64 + (((c % 64) / 8) ^ (r % 8)) * 8 + c % 8;
}

// Shared-memory matrix descriptors with the 128-byte swizzle, as arithmetic on 16-byte units:
// the low word is the start address / 16 plus LBO / 16 << 16, the high word SBO / 16 and the
// swizzle mode. Shared addresses are below 256 KB, so the address fits its 14-bit field and an
// operand's offset within a tile is one addition to the tile's units: a product's descriptor then
// costs an add instead of an add, mask, shift and or (H100, 32K: forward 5%, fwd+bwd 3% faster).
__device__ __forceinline__ uint32_t units(const void* smem) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem)) >> 4;
}
__device__ __forceinline__ uint64_t descriptor_at(uint32_t units, uint32_t lbo, uint32_t sbo = 1024) {
  return static_cast<uint64_t>((sbo >> 4) | 1u << 30) << 32 | (units + ((lbo >> 4) << 16));
}

// Offset in 16-byte units of the operand of 16 k columns starting at column c0 of a K-major panel
// tile of `rows` rows, from row r0 (a multiple of 8); its LBO is kKmajorLbo.
constexpr uint32_t kKmajorLbo = 16;
__host__ __device__ constexpr uint32_t kmajor_units(int rows, int r0, int c0) {
  return static_cast<uint32_t>((c0 / 64) * rows * 8 + r0 * 8 + (c0 % 64) / 8);
}
// Offset in 16-byte units of the operand of 16 k rows starting at row k0 of an MN-major panel tile
// of `rows` rows, from column panel p (M or N = 64 per panel); its LBO is mnmajor_lbo(rows).
__host__ __device__ constexpr uint32_t mnmajor_units(int rows, int k0, int p = 0) {
  return static_cast<uint32_t>(p * rows * 8 + k0 * 8);
}
__host__ __device__ constexpr uint32_t mnmajor_lbo(int rows) { return static_cast<uint32_t>(rows) * 128; }

// The operands' descriptors from a tile's units (units(tile), plus a constant where tiles sit at
// known offsets from one base) or from its address.
__device__ __forceinline__ uint64_t kmajor_at(uint32_t tile, int rows, int r0, int c0) {
  return descriptor_at(tile + kmajor_units(rows, r0, c0), kKmajorLbo);
}
__device__ __forceinline__ uint64_t mnmajor_at(uint32_t tile, int rows, int k0, int p = 0) {
  return descriptor_at(tile + mnmajor_units(rows, k0, p), mnmajor_lbo(rows));
}
__device__ __forceinline__ uint64_t kmajor(const __nv_bfloat16* tile, int rows, int r0, int c0) {
  return kmajor_at(units(tile), rows, r0, c0);
}
__device__ __forceinline__ uint64_t mnmajor(const __nv_bfloat16* tile, int rows, int k0, int p = 0) {
  return mnmajor_at(units(tile), rows, k0, p);
}

// Orders this thread's register writes before the group's next products (wgmma.fence), closes a
// batch of products (commit) and waits until at most kPending batches are in flight.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Generic-proxy writes to shared memory (st.shared, cp.async) made visible to the products'
// async-proxy reads; each writing thread runs it before the barrier that publishes the writes.
__device__ __forceinline__ void fence_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Pins registers in program order around the asynchronous products: the compiler may not move
// reads of an accumulator above the wait that completes it, nor writes below the fence.
template <typename T, int kN>
__device__ __forceinline__ void pin(T (&d)[kN][4]) {
  static_assert(sizeof(T) == 4);
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (std::is_same_v<T, float>) asm volatile("" : "+f"(d[i][j])::"memory");
      else asm volatile("" : "+r"(d[i][j])::"memory");
    }
}

#if defined(LOOM_WGMMA)
// Operand lists of the accumulators: d[N / 8][4] as %0.. in the order of the C fragments.
#define LOOM_WGMMA_ACC8(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define LOOM_WGMMA_ACC64(d)                                                                    \
  LOOM_WGMMA_ACC8(d, 0), LOOM_WGMMA_ACC8(d, 1), LOOM_WGMMA_ACC8(d, 2), LOOM_WGMMA_ACC8(d, 3), \
  LOOM_WGMMA_ACC8(d, 4), LOOM_WGMMA_ACC8(d, 5), LOOM_WGMMA_ACC8(d, 6), LOOM_WGMMA_ACC8(d, 7)
#define LOOM_WGMMA_ACC128(d)                                                                     \
  LOOM_WGMMA_ACC64(d), LOOM_WGMMA_ACC8(d, 8), LOOM_WGMMA_ACC8(d, 9), LOOM_WGMMA_ACC8(d, 10),     \
  LOOM_WGMMA_ACC8(d, 11), LOOM_WGMMA_ACC8(d, 12), LOOM_WGMMA_ACC8(d, 13), LOOM_WGMMA_ACC8(d, 14), \
  LOOM_WGMMA_ACC8(d, 15)
#define LOOM_WGMMA_D32 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" "}"
#define LOOM_WGMMA_D64 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" "}"

// D (64 x 64) += A B, both from shared memory (descriptors); kTransA / kTransB: A M-major / B N-major.
// accumulate 0: D = A B (D's old values are not read; the first product of a fresh accumulator).
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, int accumulate = 1) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LOOM_WGMMA_D32
               ", %32, %33, p, 1, 1, %35, %36;\n}\n"
               : LOOM_WGMMA_ACC64(d)
               : "l"(da), "l"(db), "r"(accumulate), "n"(kTransA), "n"(kTransB));
}

// D (64 x 64) += A B, A (64 x 16) from registers (the m16n8k16 A fragment of each warp's 16 rows).
template <int kTransB>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db, int accumulate = 1) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LOOM_WGMMA_D32
               ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
               : LOOM_WGMMA_ACC64(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(kTransB));
}

// D (64 x 128) += A B, A from registers as above.
template <int kTransB>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " LOOM_WGMMA_D64
               ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
               : LOOM_WGMMA_ACC128(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1), "n"(kTransB));
}

#undef LOOM_WGMMA_D64
#undef LOOM_WGMMA_D32
#undef LOOM_WGMMA_ACC128
#undef LOOM_WGMMA_ACC64
#undef LOOM_WGMMA_ACC8
#endif  // LOOM_WGMMA

}  // namespace loom::cuda::wgmma
