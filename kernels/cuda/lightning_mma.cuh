// Lightning chunk kernel on tensor cores for bf16 storage (mma.sync m16n8k16,
// bf16 operands, fp32 accumulate); the pass algebra is in lightning_pass.cuh.
//
// One block walks the chunks of one segment of one (batch, head) and keeps the
// whole D x D state, so A = X Y^T is formed once per chunk. The block has
// D / 16 warps; warp w owns state columns (= output columns) c in
// [16 w, 16 w + 16) and holds St^T for them in registers as mma accumulators
// (16 x D, fp32): their C layout is the B layout of X St (mma.cuh), so the
// inter term reads the state straight from registers and the update
// accumulates into them. Per chunk:
//   A   = X Y^T (64 x 64), masked and decayed, rounded to bf16 into smem (all warps);
//   out = w_inter * (X St) + A Z            (each warp: 64 rows x its 16 columns);
//   St  = p[n] St + (w_update Z)^T Y         (each warp: its 16 rows of St^T).
// x, y, z are bf16 (exact operands). The operands formed in fp32 (A, the
// state, w_update z) are rounded to bf16 once; the state itself stays fp32
// (the rounding enters each use, it does not accumulate along the sequence).
// tests/cuda/lightning_test.cpp derives its bound from this. Loads are
// cp.async, a chunk ahead in output passes (two stages of x, y, z) and two
// chunks ahead in state-only passes (three stages of y, z, no x, A or output);
// two barriers per chunk in output passes, one in state-only passes. Two blocks
// share a multiprocessor (128 registers, no spills in the output passes; under
// half the shared memory): 16 warps per SM. What the 128-register cap costs
// depends on the compiler's choices: keeping the block's pass in shared memory
// (read where used) and 32-bit chunk counters took the output kernel from
// 60 spilled bytes (23 local loads/stores in its main loop) to none
// (cuobjdump -sass, tools/sass_spills.sh).
#pragma once

#include <cuda_bf16.h>

#include "kernels/cuda/lightning_pass.cuh"
#include "kernels/cuda/mma.cuh"

namespace loom::cuda::lightning_detail {

using namespace ::loom::cuda::mma;

template <int kD, bool kStateOnly>
struct HeadKernel {
  static_assert(kD % 16 == 0 && kD <= kMaxHeadDim, "head dims 16, 32, ..., 128");
  static constexpr int kWarps = kD / 16;
  static constexpr int kThreads = 32 * kWarps;
  // Registers kept to 128 and shared memory to under half a multiprocessor, so
  // two blocks (two heads or segments) share one: 16 warps per SM.
  static constexpr int kMinBlocks = 2;
  static constexpr int kLd = kD + 8;       // bf16 row stride of x, y, z (16-byte rows, conflict-free ldmatrix)
  static constexpr int kLdA = kChunk + 8;  // of A
  // Stages of the chunk's rows loaded by cp.async a chunk or two ahead: a
  // state-only pass keeps three stages of (y, z) (chunk c + 2 loads while c is
  // computed), an output pass two of (x, y, z) (c + 1 loads while c is
  // computed), both under half the shared memory of a multiprocessor.
  static constexpr int kTiles = kStateOnly ? 2 : 3;  // row tiles per stage: (y, z) or (x, y, z)
  static constexpr int kStages = kStateOnly ? 3 : 2;
  static constexpr int kStage = kTiles * kChunk * kLd;
  // + A (output passes), fp32 decay powers (kChunk + 1) and two buffers of the
  // row weights (w_inter, w_update: 2 x kChunk each).
  static constexpr size_t kBytes = 2 * (kStages * kStage + (kStateOnly ? 0 : kChunk * kLdA)) + 4 * (kChunk + 1) +
                                   4 * 2 * 2 * kChunk;
};

// The chunk's rows [0, n) of one head of src into dst (kChunk rows, row
// stride kD + 8; zeros past n and for a null src); `at` is the element offset
// of the chunk's first row of this head, rows are ps.H * ps.D elements apart.
// cp.async when the rows are whole 16-byte vectors (D == kD, 16-byte aligned
// tensors), synchronous element loads otherwise. The caller commits the group.
// Offsets within a chunk are 32-bit (63 rows of at most 65535 heads of 128).
template <int kD, int kThreads, bool kVectors>
__device__ __forceinline__ void load_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, const PassSet& ps,
                                          int64_t at, int n) {
  constexpr int kLd = kD + 8;
  const int row_elems = static_cast<int>(ps.H * ps.D);
  if constexpr (kVectors) {
    // Thread -> 16-byte column c of rows r0, r0 + kRowStep, ...
    constexpr int kVecs = kD / 8, kRowStep = kThreads / kVecs;
    static_assert(kThreads % kVecs == 0 && kChunk % kRowStep == 0);
    const int r0 = threadIdx.x / kVecs, c = (threadIdx.x % kVecs) * 8;
    const __nv_bfloat16* rows = src + at;
#pragma unroll
    for (int i = 0; i < kChunk / kRowStep; ++i) {
      const int r = r0 + i * kRowStep;
      const bool valid = src != nullptr && r < n;
      const void* from = valid ? static_cast<const void*>(rows + (r * row_elems + c))
                               : static_cast<const void*>(ps.powers);  // read nothing
      cp_async16(dst + r * kLd + c, from, valid);
    }
  } else {
    for (int e = threadIdx.x; e < kChunk * kD; e += kThreads) {
      const int r = e / kD, c = e % kD;
      __nv_bfloat16 value = __float2bfloat16_rn(0.f);
      if (src != nullptr && r < n && c < ps.D) value = src[at + (r * row_elems + c)];
      dst[r * kLd + c] = value;
    }
  }
}

// bf16 pair (lo, hi halves) times (w0, w1), rounded back to bf16.
__device__ __forceinline__ uint32_t scale_pair(uint32_t v, float w0, float w1) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  return pack_bf16(__floats2bfloat162_rn(w0 * f.x, w1 * f.y));
}

template <int kD, bool kStateOnly, bool kVectors>
__global__ void __launch_bounds__(HeadKernel<kD, kStateOnly>::kThreads, HeadKernel<kD, kStateOnly>::kMinBlocks)
    lightning_mma_kernel(PassSet ps) {
  using K = HeadKernel<kD, kStateOnly>;
  constexpr int kLd = K::kLd, kLdA = K::kLdA, kWarps = K::kWarps;
  constexpr int kNt = kD / 8;  // 8-wide tiles of the state's D (y) dimension
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* stages = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // kStages x ([x,] y, z) (kChunk, kLd)
  __nv_bfloat16* as = stages + K::kStages * K::kStage;                 // (kChunk, kLdA), output passes
  float* pw = reinterpret_cast<float*>(as + (kStateOnly ? 0 : kChunk * kLdA));  // (kChunk + 1)
  float* weights = pw + kChunk + 1;  // 2 buffers x (w_inter, w_update) (kChunk each)

  // The block's pass in shared memory, read (volatile) where used rather than
  // held in registers through the chunk loop (see the top).
  __shared__ Pass pass_smem;
  if (threadIdx.x == 0) pass_smem = blockIdx.x == 0 ? ps.pass[0] : blockIdx.x == 1 ? ps.pass[1] : ps.pass[2];
  __syncthreads();
  const volatile Pass& pass = pass_smem;
  const int64_t h = blockIdx.y, b = blockIdx.z / ps.segments;
  const int segment = static_cast<int>(blockIdx.z % ps.segments);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int c0 = 16 * warp;  // this warp's state columns / output columns
  const int64_t state_base = (b * ps.H + h) * ps.D * ps.D;

  for (int m = threadIdx.x; m <= kChunk; m += K::kThreads) pw[m] = ps.powers[h * (kChunk + 1) + m];

  // st[nt][0..1] = St[8 nt + 2 t4 + (0, 1)][c0 + g], st[nt][2..3] the same for column c0 + g + 8.
  float st[kNt][4];
  {
    const float* in = pass.state_in == nullptr ? nullptr : pass.state_in + segment * pass.state_in_stride + state_base;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t r = 8 * nt + 2 * t4 + (e & 1), c = c0 + g + 8 * (e >> 1);
        float value = 0.f;
        if (in != nullptr && r < ps.D && c < ps.D) value = in[pass.transpose_in ? c * ps.D + r : r * ps.D + c];
        st[nt][e] = value;
      }
  }

  const int64_t seg_t0 = segment * ps.seg_len;
  const int64_t seg_t1 = seg_t0 + ps.seg_len < ps.T ? seg_t0 + ps.seg_len : ps.T;
  const int chunks = seg_t1 > seg_t0 ? static_cast<int>((seg_t1 - seg_t0 + kChunk - 1) / kChunk) : 0;
  auto chunk_at = [&](int step, int64_t& t0, int& n) {
    const int chunk = pass.reverse ? chunks - 1 - step : step;
    t0 = seg_t0 + chunk * kChunk;
    n = static_cast<int>(seg_t1 - t0 < kChunk ? seg_t1 - t0 : kChunk);
  };
  // One cp.async group (empty past the end): chunk `step`'s rows ([x,] y, z) into stage `stage`.
  auto load_stage = [&](int step, int stage) {
    if (step < chunks) {
      int64_t t0;
      int n;
      chunk_at(step, t0, n);
      __nv_bfloat16* dst = stages + stage * K::kStage;
      const int64_t at = ((b * ps.T + t0) * ps.H + h) * ps.D;
      if constexpr (!kStateOnly) {
        load_rows<kD, K::kThreads, kVectors>(dst, static_cast<const __nv_bfloat16*>(pass.x), ps, at, n);
        dst += kChunk * kLd;
      }
      load_rows<kD, K::kThreads, kVectors>(dst, static_cast<const __nv_bfloat16*>(pass.y), ps, at, n);
      load_rows<kD, K::kThreads, kVectors>(dst + kChunk * kLd, static_cast<const __nv_bfloat16*>(pass.z), ps, at, n);
    }
    cp_async_commit();
  };
  // Row weights of chunk `step` into buffer step % 2 (zero past n): w_inter(i) = inter p[i + 1]
  // (reverse: p[n - 1 - i]), w_update(j) = update p[n - 1 - j] (reverse: p[j + 1]).
  auto set_weights = [&](int step) {
    if (step >= chunks) return;
    int64_t t0;
    int n;
    chunk_at(step, t0, n);
    float* w = weights + (step & 1) * 2 * kChunk;
    for (int i = threadIdx.x; i < kChunk; i += K::kThreads) {
      const bool valid = i < n;
      w[i] = valid ? pass.inter * pw[pass.reverse ? n - 1 - i : i + 1] : 0.f;
      w[kChunk + i] = valid ? pass.update * pw[pass.reverse ? i + 1 : n - 1 - i] : 0.f;
    }
  };
  load_stage(0, 0);
  if constexpr (kStateOnly) load_stage(1, 1);
  __syncthreads();  // pw
  set_weights(0);

  int stage = 0;  // this chunk's stage
  for (int step = 0; step < chunks; ++step) {
    int64_t t0;
    int n;
    chunk_at(step, t0, n);
    const __nv_bfloat16* xs = stages + stage * K::kStage;  // output passes
    const __nv_bfloat16* ys = xs + (kStateOnly ? 0 : kChunk * kLd);
    const __nv_bfloat16* zs = ys + kChunk * kLd;
    const float* w_inter = weights + (step & 1) * 2 * kChunk;
    const float* w_update = w_inter + kChunk;
    // This chunk's rows have landed (the next chunk's may still fly in a
    // state-only pass) for every thread; chunk step - 1 (its stage, A,
    // weights) is consumed, so its stage takes the chunk kStages - 1 ahead.
    cp_async_wait<K::kStages - 2>();
    __syncthreads();
    load_stage(step + K::kStages - 1, stage == 0 ? K::kStages - 1 : stage - 1);
    set_weights(step + 1);
    stage = stage == K::kStages - 1 ? 0 : stage + 1;

    if constexpr (!kStateOnly) {
      // A (64 x 64) in tiles of 16 x 8: warp -> row tiles mt = warp % kRowWarps + kRowWarps i, column tiles
      // [kNPer * (warp / kRowWarps), + kNPer).
      {
        constexpr int kRowWarps = kWarps < 4 ? kWarps : 4;
        constexpr int kNPer = 8 / (kWarps / kRowWarps);
        const int n0 = 8 * kNPer * (warp / kRowWarps);
#pragma unroll
        for (int mt = warp % kRowWarps; mt < 4; mt += kRowWarps) {
          float acc[kNPer][4] = {};
#pragma unroll
          for (int k0 = 0; k0 < kD; k0 += 16) {
            uint32_t a[4];
            ldsm_a(a, xs, kLd, 16 * mt, k0);
#pragma unroll
            for (int np = 0; np < kNPer; np += 2) {
              uint32_t bb[4];
              ldsm_b2_nmajor(bb, ys, kLd, n0 + 8 * np, k0);  // B[k = d][n = j] = y[j][d]
              mma_bf16(acc[np], a, bb[0], bb[1]);
              mma_bf16(acc[np + 1], a, bb[2], bb[3]);
            }
          }
#pragma unroll
          for (int np = 0; np < kNPer; ++np)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int i = 16 * mt + g + 8 * half, j = n0 + 8 * np + 2 * t4;
              float v[2];
#pragma unroll
              for (int q = 0; q < 2; ++q) {
                const int lag = pass.reverse ? j + q - i : i - j - q;
                v[q] = lag >= 0 ? pass.intra * pw[lag] * acc[np][2 * half + q] : 0.f;
              }
              *reinterpret_cast<__nv_bfloat162*>(as + i * kLdA + j) = __floats2bfloat162_rn(v[0], v[1]);
            }
        }
      }
      __syncthreads();  // A is complete
      // out (64 rows x this warp's 16 columns) = w_inter * (X St) + A Z.
      const int64_t row_elems = ps.H * ps.D;
      __nv_bfloat16* out_row0 = static_cast<__nv_bfloat16*>(pass.out) + ((b * ps.T + t0) * ps.H + h) * ps.D;
      {
        float acc[4][2][4] = {};
#pragma unroll
        for (int k0 = 0; k0 < kD; k0 += 16) {
          const int s = k0 / 16;
          uint32_t bb[2][2];  // B[k = d][n = c] = St[d][c] from the registers
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            bb[hh][0] = pack_bf16(__floats2bfloat162_rn(st[2 * s][2 * hh], st[2 * s][2 * hh + 1]));
            bb[hh][1] = pack_bf16(__floats2bfloat162_rn(st[2 * s + 1][2 * hh], st[2 * s + 1][2 * hh + 1]));
          }
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
            uint32_t a[4];
            ldsm_a(a, xs, kLd, 16 * mt, k0);
            mma_bf16(acc[mt][0], a, bb[0][0], bb[0][1]);
            mma_bf16(acc[mt][1], a, bb[1][0], bb[1][1]);
          }
        }
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          const float w0 = w_inter[16 * mt + g], w1 = w_inter[16 * mt + g + 8];
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            acc[mt][hh][0] *= w0, acc[mt][hh][1] *= w0;
            acc[mt][hh][2] *= w1, acc[mt][hh][3] *= w1;
          }
        }
#pragma unroll
        for (int k0 = 0; k0 < kChunk; k0 += 16) {
          uint32_t bb[4];
          ldsm_b2_kmajor(bb, zs, kLd, c0, k0);  // B[k = j][n = c] = z[j][c]
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
            uint32_t a[4];
            ldsm_a(a, as, kLdA, 16 * mt, k0);
            mma_bf16(acc[mt][0], a, bb[0], bb[1]);
            mma_bf16(acc[mt][1], a, bb[2], bb[3]);
          }
        }
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int i = 16 * mt + g + 8 * half;
              const int64_t col = c0 + 8 * hh + 2 * t4;
              if (i >= n) continue;
              const float o0 = acc[mt][hh][2 * half], o1 = acc[mt][hh][2 * half + 1];
              __nv_bfloat16* dst = out_row0 + i * row_elems + col;
              if (col + 1 < ps.D && ps.D % 2 == 0) {
                *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(o0, o1);
              } else {
                if (col < ps.D) dst[0] = __float2bfloat16_rn(o0);
                if (col + 1 < ps.D) dst[1] = __float2bfloat16_rn(o1);
              }
            }
      }
    }

    // St^T (this warp's 16 rows x D) = p[n] St^T + (w_update z)^T y.
    {
      const float decay = pw[n];
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] *= decay;
#pragma unroll
      for (int k0 = 0; k0 < kChunk; k0 += 16) {
        uint32_t a[4];
        ldsm_a_kmajor(a, zs, kLd, c0, k0);  // A[m = c][k = j] = z[j][c], then times w_update[j]
        const float w0 = w_update[k0 + 2 * t4], w1 = w_update[k0 + 2 * t4 + 1];
        const float w2 = w_update[k0 + 2 * t4 + 8], w3 = w_update[k0 + 2 * t4 + 9];
        a[0] = scale_pair(a[0], w0, w1);
        a[1] = scale_pair(a[1], w0, w1);
        a[2] = scale_pair(a[2], w2, w3);
        a[3] = scale_pair(a[3], w2, w3);
#pragma unroll
        for (int np = 0; np < kNt; np += 2) {
          uint32_t bb[4];
          ldsm_b2_kmajor(bb, ys, kLd, 8 * np, k0);  // B[k = j][n = d] = y[j][d]
          mma_bf16(st[np], a, bb[0], bb[1]);
          mma_bf16(st[np + 1], a, bb[2], bb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  if (pass.state_out != nullptr) {
    float* out = pass.state_out + segment * static_cast<int64_t>(ps.B * ps.H * ps.D * ps.D) + state_base;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t r = 8 * nt + 2 * t4 + (e & 1), c = c0 + g + 8 * (e >> 1);
        if (r < ps.D && c < ps.D) out[r * ps.D + c] = st[nt][e];
      }
  }
}

}  // namespace loom::cuda::lightning_detail
