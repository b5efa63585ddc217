// Warp-level tensor-core helpers shared by the bf16 kernels (lightning,
// flash attention): mma.sync m16n8k16 (bf16 operands, fp32 accumulate) and
// the fragment loads from shared memory. Fragment layouts (PTX ISA, m16n8k16,
// lane = 4 g + t): A (16 x 16, row-major) a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..),
// a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..); B (16 x 8) b0 = (k 2t..2t+1, n g),
// b1 = (k 2t + 8.., n g); C/D (16 x 8) c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..).
// So the C fragments of two adjacent n-tiles (n 0..15) are, packed to bf16,
// exactly the A fragment of a k-step of 16: a0 = C0[0..1], a1 = C0[2..3],
// a2 = C1[0..1], a3 = C1[2..3] (flash attention's P V and dS K use this).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace loom::cuda::mma {

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

// (hi, lo) bf16 pairs of two fp32 values: hi + lo equals (a, b) to ~2^-17 relative.
__device__ __forceinline__ void split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  hi = pack_bf16(h);
  lo = pack_bf16(__floats2bfloat162_rn(a - hf.x, b - hf.y));
}

__device__ __forceinline__ uint32_t lds32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment (16 x 16) of a row-major bf16 tile at (row0, k0), row stride ld.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int row0, int k0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const __nv_bfloat16* p = s + (row0 + g) * ld + k0 + 2 * t;
  a[0] = lds32(p);
  a[1] = lds32(p + 8 * ld);
  a[2] = lds32(p + 8);
  a[3] = lds32(p + 8 * ld + 8);
}

// B fragment (k 16 x n 8) where B[k][n] = s[(n0 + n) * ld + k0 + k] (the "col" operand stored n-major).
__device__ __forceinline__ void load_b_nmajor(uint32_t& b0, uint32_t& b1, const __nv_bfloat16* s, int ld, int n0,
                                              int k0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const __nv_bfloat16* p = s + (n0 + g) * ld + k0 + 2 * t;
  b0 = lds32(p);
  b1 = lds32(p + 8);
}

// B fragment (k 16 x n 8) where B[k][n] = s[(k0 + k) * ld + n0 + n] (stored k-major): ldmatrix.trans.
__device__ __forceinline__ void load_b_kmajor(uint32_t& b0, uint32_t& b1, const __nv_bfloat16* s, int ld, int n0,
                                              int k0) {
  const int lane = threadIdx.x % 32;
  const __nv_bfloat16* p = s + (k0 + (lane % 16)) * ld + n0;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(addr));
}

// ldmatrix x4: four 8 x 8 bf16 matrices; lane l gives the address of row l % 8
// of matrix l / 8, and r[i] is this lane's fragment of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const __nv_bfloat16* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// A fragment (16 x 16) of a row-major tile at (row0, k0) in one ldmatrix.x4
// (same registers as load_a): matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int row0, int k0) {
  const int lane = threadIdx.x % 32;
  ldsm_x4(a, s + (row0 + lane % 16) * ld + k0 + (lane / 16) * 8);
}

// A fragment (16 x 16) of a tile stored k-major (A[m][k] = s[(k0 + k) * ld + m0 + m]), transposed on
// load: matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) as in ldsm_a.
__device__ __forceinline__ void ldsm_a_kmajor(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  ldsm_x4_trans(a, s + (k0 + lane % 8 + (lane / 16) * 8) * ld + m0 + ((lane / 8) % 2) * 8);
}

// B fragments of two n-tiles (n0, n0 + 8) x k 16 stored n-major (B[k][n] = s[(n0 + n) * ld + k0 + k]):
// b[0], b[1] = b0, b1 of n-tile n0; b[2], b[3] of n-tile n0 + 8 (same registers as load_b_nmajor).
__device__ __forceinline__ void ldsm_b2_nmajor(uint32_t (&b)[4], const __nv_bfloat16* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ldsm_x4(b, s + (n0 + lane % 8 + (lane / 16) * 8) * ld + k0 + ((lane / 8) % 2) * 8);
}

// The same for B stored k-major (B[k][n] = s[(k0 + k) * ld + n0 + n]), transposed on load.
__device__ __forceinline__ void ldsm_b2_kmajor(uint32_t (&b)[4], const __nv_bfloat16* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ldsm_x4_trans(b, s + (k0 + lane % 16) * ld + n0 + (lane / 16) * 8);
}

// Shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Asynchronous global -> shared copies (cp.async): `valid` false zero-fills
// the destination and reads nothing (gmem must still be a global address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// 2^x on the special-function unit (flushes subnormal results to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace loom::cuda::mma
