// Lightning chunk kernel on tensor cores for bf16 storage (mma.sync m16n8k16,
// bf16 operands, fp32 accumulate); the pass algebra is in lightning_pass.cuh.
// x, y, z are bf16 and exact as operands. Operands formed in fp32 (the masked
// and decayed A, the state, the decay-weighted z of the update) are split
// into a bf16 high and low part and multiplied twice, so the result keeps
// about 16 mantissa bits (relative error ~1e-5, close to the fp32 CUDA-core
// kernel) at twice the tensor work, which is far from the limit here.
// Per chunk, 8 warps: A = X Y^T (64 x 64) -> smem as hi/lo; out (64 x 32) =
// A Z + w X St; St^T (32 x D) = p St^T + (w Z)^T Y, St^T kept in smem in fp32.
#pragma once

#include <cuda_bf16.h>

#include "kernels/cuda/lightning_pass.cuh"
#include "kernels/cuda/mma.cuh"

namespace loom::cuda::lightning_detail {

using namespace ::loom::cuda::mma;

// dst (kChunk rows, kD columns, row stride ld) <- rows [t0, t0 + n) of one head (zero padded).
template <int kD>
__device__ __forceinline__ void load_rows_bf16(__nv_bfloat16* dst, int ld, const __nv_bfloat16* src, const PassSet& ps,
                                               int64_t b, int64_t h, int64_t t0, int n) {
  if (src != nullptr && ps.D == kD && reinterpret_cast<uintptr_t>(src) % 16 == 0) {  // rows are 16-byte aligned
    constexpr int kVecs = kD / 8;  // 16-byte vectors per row
    for (int e = threadIdx.x; e < kChunk * kVecs; e += kThreads) {
      const int r = e / kVecs, c = (e % kVecs) * 8;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (r < n) value = *reinterpret_cast<const uint4*>(src + ((b * ps.T + t0 + r) * ps.H + h) * ps.D + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = value;
    }
  } else {
    for (int e = threadIdx.x; e < kChunk * kD; e += kThreads) {
      const int r = e / kD, c = e % kD;
      __nv_bfloat16 value = __float2bfloat16_rn(0.f);
      if (src != nullptr && r < n && c < ps.D) value = src[((b * ps.T + t0 + r) * ps.H + h) * ps.D + c];
      dst[r * ld + c] = value;
    }
  }
}

// One chunk's x and y rows and its z column slice [c0, c0 + 32), loaded into
// registers one chunk ahead so that the global loads are in flight while the
// current chunk is computed (only when the rows are whole 16-byte vectors:
// D == kD >= 32 and 16-byte aligned tensors; the synchronous loads otherwise).
template <int kD>
struct ChunkPrefetch {
  static constexpr int kVecs = kD / 8;                                  // 16-byte vectors per row
  static constexpr int kPerThread = (kChunk * kVecs + kThreads - 1) / kThreads;
  static_assert(kChunk * kCols / 8 == kThreads, "one 8-column piece of the z slice per thread");
  uint4 x[kPerThread], y[kPerThread], z;

  static __device__ bool applies(const PassSet& ps, const void* x, const void* y, const void* z) {
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    return kD >= kCols && ps.D == kD && aligned(x) && aligned(y) && aligned(z);
  }

  // Issues the loads of rows [t0, t0 + n) (zeros past n and for null tensors; x only when load_x).
  __device__ void issue(const __nv_bfloat16* xp, const __nv_bfloat16* yp, const __nv_bfloat16* zp, const PassSet& ps,
                        int64_t b, int64_t h, int64_t t0, int n, int64_t c0, bool load_x) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const int r = e / kVecs, c = (e % kVecs) * 8;
      const bool valid = e < kChunk * kVecs && r < n;
      const int64_t at = ((b * ps.T + t0 + r) * ps.H + h) * ps.D + c;
      x[i] = valid && load_x && xp != nullptr ? __ldg(reinterpret_cast<const uint4*>(xp + at)) : zero;
      y[i] = valid && yp != nullptr ? __ldg(reinterpret_cast<const uint4*>(yp + at)) : zero;
    }
    const int j = threadIdx.x / (kCols / 8), c = 8 * (threadIdx.x % (kCols / 8));
    z = j < n && zp != nullptr ? __ldg(reinterpret_cast<const uint4*>(zp + ((b * ps.T + t0 + j) * ps.H + h) * ps.D + c0 + c))
                               : zero;
  }

  // Writes the chunk into shared memory: x, y rows (row stride ld), z^T and the
  // decay-weighted (w z)^T as bf16 high + low parts (w_update(j) gives the weight of row j).
  template <typename Weight>
  __device__ void store(__nv_bfloat16* xs, __nv_bfloat16* ys, int ld, __nv_bfloat16* zt, __nv_bfloat16* zw_hi,
                        __nv_bfloat16* zw_lo, int ldz, bool store_x, Weight w_update) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e >= kChunk * kVecs) continue;
      const int r = e / kVecs, c = (e % kVecs) * 8;
      if (store_x) *reinterpret_cast<uint4*>(xs + r * ld + c) = x[i];
      *reinterpret_cast<uint4*>(ys + r * ld + c) = y[i];
    }
    const int j = threadIdx.x / (kCols / 8), c = 8 * (threadIdx.x % (kCols / 8));
    const float w = w_update(j);
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&z);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float f = __bfloat162float(v[q]);
      const __nv_bfloat16 hi = __float2bfloat16_rn(w * f);
      zt[(c + q) * ldz + j] = v[q];
      zw_hi[(c + q) * ldz + j] = hi;
      zw_lo[(c + q) * ldz + j] = __float2bfloat16_rn(w * f - __bfloat162float(hi));
    }
  }
};

template <int kD>
struct MmaSmem {
  static constexpr int kXs = kD + 8;      // bf16 row stride of x, y (conflict-free fragment loads)
  static constexpr int kZs = kChunk + 8;  // bf16 row stride of z^T, (w z)^T, A
  static constexpr int kSs = kD + 4;      // fp32 row stride of St^T
  static constexpr size_t kBytes = 2 * (2 * kChunk * kXs + 3 * kCols * kZs + 2 * kChunk * kZs) +
                                   4 * (kCols * kSs + (kChunk + 1) + 2 * kChunk);
};

template <int kD>
__global__ void __launch_bounds__(kThreads) lightning_mma_kernel(PassSet ps) {
  using S = MmaSmem<kD>;
  constexpr int kXs = S::kXs, kZs = S::kZs, kSs = S::kSs;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // (kChunk, kXs)
  __nv_bfloat16* ys = xs + kChunk * kXs;                             // (kChunk, kXs)
  __nv_bfloat16* zt = ys + kChunk * kXs;                             // (kCols, kZs): z^T
  __nv_bfloat16* zw_hi = zt + kCols * kZs;                           // (kCols, kZs): (w_update z)^T
  __nv_bfloat16* zw_lo = zw_hi + kCols * kZs;
  __nv_bfloat16* a_hi = zw_lo + kCols * kZs;                         // (kChunk, kZs): masked, decayed A
  __nv_bfloat16* a_lo = a_hi + kChunk * kZs;
  float* st = reinterpret_cast<float*>(a_lo + kChunk * kZs);         // (kCols, kSs): St^T
  float* pw = st + kCols * kSs;                                      // (kChunk + 1)
  float* w_inter = pw + kChunk + 1;                                  // (kChunk)
  float* w_update = w_inter + kChunk;                                // (kChunk)

  const int which = blockIdx.x / ps.tiles;
  const Pass pass = which == 0 ? ps.pass[0] : which == 1 ? ps.pass[1] : ps.pass[2];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % ps.tiles) * kCols;
  const int64_t h = blockIdx.y, b = blockIdx.z / ps.segments;
  const int segment = static_cast<int>(blockIdx.z % ps.segments);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const auto* x = static_cast<const __nv_bfloat16*>(pass.x);
  const auto* y = static_cast<const __nv_bfloat16*>(pass.y);
  const auto* z = static_cast<const __nv_bfloat16*>(pass.z);
  const int64_t state_base = (b * ps.H + h) * ps.D * ps.D;

  for (int m = threadIdx.x; m <= kChunk; m += kThreads) pw[m] = ps.powers[h * (kChunk + 1) + m];
  {
    const float* in = pass.state_in == nullptr ? nullptr : pass.state_in + segment * pass.state_in_stride + state_base;
    for (int e = threadIdx.x; e < kCols * kD; e += kThreads) {
      const int c = e / kD, r = e % kD;  // st[c][r] = St[r][c]
      const int64_t col = c0 + c;
      float value = 0.f;
      if (in != nullptr && r < ps.D && col < ps.D) value = in[pass.transpose_in ? col * ps.D + r : r * ps.D + col];
      st[c * kSs + r] = value;
    }
  }

  const int64_t seg_t0 = segment * ps.seg_len;
  const int64_t seg_t1 = seg_t0 + ps.seg_len < ps.T ? seg_t0 + ps.seg_len : ps.T;
  const int64_t chunks = seg_t1 > seg_t0 ? (seg_t1 - seg_t0 + kChunk - 1) / kChunk : 0;
  // The synchronous loads (rows that are not whole 16-byte vectors); ends before the caller's barrier.
  auto load_chunk_sync = [&](int64_t t0, int n) {
    if (!pass.state_only) load_rows_bf16<kD>(xs, kXs, x, ps, b, h, t0, n);
    load_rows_bf16<kD>(ys, kXs, y, ps, b, h, t0, n);
    if (threadIdx.x < kChunk) {
      const int i = threadIdx.x;
      const bool valid = i < n;
      w_inter[i] = valid ? pass.inter * pw[pass.reverse ? n - 1 - i : i + 1] : 0.f;
      w_update[i] = valid ? pass.update * pw[pass.reverse ? i + 1 : n - 1 - i] : 0.f;
    }
    __syncthreads();  // w_update is read below
    for (int e = threadIdx.x; e < kChunk * kCols / 2; e += kThreads) {
      const int j = e / (kCols / 2), c = 2 * (e % (kCols / 2));  // two columns of row j
      float v0 = 0.f, v1 = 0.f;
      if (z != nullptr && j < n) {
        const int64_t base = ((b * ps.T + t0 + j) * ps.H + h) * ps.D;
        if (c0 + c < ps.D) v0 = __bfloat162float(z[base + c0 + c]);
        if (c0 + c + 1 < ps.D) v1 = __bfloat162float(z[base + c0 + c + 1]);
      }
      zt[c * kZs + j] = __float2bfloat16_rn(v0);
      zt[(c + 1) * kZs + j] = __float2bfloat16_rn(v1);
      const float w = w_update[j];
      const __nv_bfloat16 h0 = __float2bfloat16_rn(w * v0), h1 = __float2bfloat16_rn(w * v1);
      zw_hi[c * kZs + j] = h0;
      zw_hi[(c + 1) * kZs + j] = h1;
      zw_lo[c * kZs + j] = __float2bfloat16_rn(w * v0 - __bfloat162float(h0));
      zw_lo[(c + 1) * kZs + j] = __float2bfloat16_rn(w * v1 - __bfloat162float(h1));
    }
  };
  // Chunk `step` of the walk: its first token and its length.
  auto chunk_at = [&](int64_t step, int64_t& t0, int& n) {
    const int64_t chunk = pass.reverse ? chunks - 1 - step : step;
    t0 = seg_t0 + chunk * kChunk;
    n = static_cast<int>(seg_t1 - t0 < kChunk ? seg_t1 - t0 : kChunk);
  };
  ChunkPrefetch<kD> pf;
  const bool prefetch = ChunkPrefetch<kD>::applies(ps, x, y, z);
  if (prefetch && chunks > 0) {
    int64_t t0;
    int n;
    chunk_at(0, t0, n);
    pf.issue(x, y, z, ps, b, h, t0, n, c0, !pass.state_only);
  }
  for (int64_t step = 0; step < chunks; ++step) {
    int64_t t0;
    int n;
    chunk_at(step, t0, n);
    __syncthreads();  // the previous chunk's tiles are consumed
    if (prefetch) {
      pf.store(xs, ys, kXs, zt, zw_hi, zw_lo, kZs, !pass.state_only, [&](int j) {
        return j < n ? pass.update * pw[pass.reverse ? j + 1 : n - 1 - j] : 0.f;
      });
      if (threadIdx.x < kChunk) {
        const int i = threadIdx.x;
        w_inter[i] = i < n ? pass.inter * pw[pass.reverse ? n - 1 - i : i + 1] : 0.f;
      }
      if (step + 1 < chunks) {  // the next chunk's loads fly while this one is computed
        int64_t t1;
        int n1;
        chunk_at(step + 1, t1, n1);
        pf.issue(x, y, z, ps, b, h, t1, n1, c0, !pass.state_only);
      }
    } else {
      load_chunk_sync(t0, n);
    }
    __syncthreads();


    if (!pass.state_only) {
      // A (64 x 64): warp -> rows 16 (warp / 2), columns 32 (warp % 2) .. + 32.
      {
        const int i0 = 16 * (warp / 2), j0 = 32 * (warp % 2);
        float acc[4][4] = {};
#pragma unroll
        for (int k0 = 0; k0 < kD; k0 += 16) {
          uint32_t a[4];
          load_a(a, xs, kXs, i0, k0);
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            uint32_t b0, b1;
            load_b_nmajor(b0, b1, ys, kXs, j0 + 8 * nt, k0);
            mma_bf16(acc[nt], a, b0, b1);
          }
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int i = i0 + g + 8 * half, j = j0 + 8 * nt + 2 * t4;
            float v[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const int lag = pass.reverse ? j + q - i : i - j - q;
              v[q] = lag >= 0 ? pass.intra * pw[lag] * acc[nt][2 * half + q] : 0.f;
            }
            uint32_t hi, lo;
            split2(v[0], v[1], hi, lo);
            *reinterpret_cast<uint32_t*>(a_hi + i * kZs + j) = hi;
            *reinterpret_cast<uint32_t*>(a_lo + i * kZs + j) = lo;
          }
      }
      __syncthreads();
      // out (64 x 32): warp -> rows 16 (warp / 2), columns 16 (warp % 2) .. + 16.
      {
        const int i0 = 16 * (warp / 2), n0 = 16 * (warp % 2);
        float intra[2][4] = {}, inter[2][4] = {};
#pragma unroll
        for (int k0 = 0; k0 < kChunk; k0 += 16) {
          uint32_t ah[4], al[4];
          load_a(ah, a_hi, kZs, i0, k0);
          load_a(al, a_lo, kZs, i0, k0);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            uint32_t b0, b1;
            load_b_nmajor(b0, b1, zt, kZs, n0 + 8 * nt, k0);
            mma_bf16(intra[nt], ah, b0, b1);
            mma_bf16(intra[nt], al, b0, b1);
          }
        }
#pragma unroll
        for (int k0 = 0; k0 < kD; k0 += 16) {
          uint32_t a[4];
          load_a(a, xs, kXs, i0, k0);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const float* sp = st + (n0 + 8 * nt + g) * kSs + k0 + 2 * t4;  // B[k = d][n = c] = St^T[c][d]
            const float2 s01 = *reinterpret_cast<const float2*>(sp);
            const float2 s89 = *reinterpret_cast<const float2*>(sp + 8);
            uint32_t h0, l0, h1, l1;
            split2(s01.x, s01.y, h0, l0);
            split2(s89.x, s89.y, h1, l1);
            mma_bf16(inter[nt], a, h0, h1);
            mma_bf16(inter[nt], a, l0, l1);
          }
        }
        auto* out = static_cast<__nv_bfloat16*>(pass.out);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int i = i0 + g + 8 * half;
            const int64_t col = c0 + n0 + 8 * nt + 2 * t4;
            if (i >= n) continue;
            const float o0 = intra[nt][2 * half] + w_inter[i] * inter[nt][2 * half];
            const float o1 = intra[nt][2 * half + 1] + w_inter[i] * inter[nt][2 * half + 1];
            __nv_bfloat16* dst = out + ((b * ps.T + t0 + i) * ps.H + h) * ps.D + col;
            if (col + 1 < ps.D && ps.D % 2 == 0) {
              *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(o0, o1);
            } else {
              if (col < ps.D) dst[0] = __float2bfloat16_rn(o0);
              if (col + 1 < ps.D) dst[1] = __float2bfloat16_rn(o1);
            }
          }
      }
      __syncthreads();  // st is read above and rewritten below
    }

    // St^T (32 x kD) = p[n] St^T + (w z)^T y: tiles of 16 x 8, tile -> rows 16 (tile % 2), columns 8 (tile / 2).
    {
      const float decay = pw[n];
      constexpr int kTiles = 2 * (kD / 8);
#pragma unroll
      for (int tile = warp; tile < kTiles; tile += kThreads / 32) {
        const int m0 = 16 * (tile % 2), d0 = 8 * (tile / 2);
        float* c_lo = st + (m0 + g) * kSs + d0 + 2 * t4;
        float* c_hi = c_lo + 8 * kSs;
        float acc[4] = {decay * c_lo[0], decay * c_lo[1], decay * c_hi[0], decay * c_hi[1]};
#pragma unroll
        for (int k0 = 0; k0 < kChunk; k0 += 16) {
          uint32_t ah[4], al[4], b0, b1;
          load_a(ah, zw_hi, kZs, m0, k0);
          load_a(al, zw_lo, kZs, m0, k0);
          load_b_kmajor(b0, b1, ys, kXs, d0, k0);  // B[k = j][n = d] = y[j][d]
          mma_bf16(acc, ah, b0, b1);
          mma_bf16(acc, al, b0, b1);
        }
        c_lo[0] = acc[0], c_lo[1] = acc[1], c_hi[0] = acc[2], c_hi[1] = acc[3];
      }
    }
  }
  if (pass.state_out != nullptr) {
    __syncthreads();
    float* out = pass.state_out + segment * static_cast<int64_t>(ps.B * ps.H * ps.D * ps.D) + state_base;
    for (int e = threadIdx.x; e < kCols * kD; e += kThreads) {
      const int r = e / kCols, c = e % kCols;  // coalesced along columns of the state
      const int64_t col = c0 + c;
      if (r < ps.D && col < ps.D) out[r * ps.D + col] = st[c * kSs + r];
    }
  }
}

}  // namespace loom::cuda::lightning_detail
