// Flash attention on tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation) for bf16 storage and head dims 64 and 128, with the interim
// kernels' contract (attention_launch.h): GQA, causal mask by global i64
// positions (any order: contiguous, zigzag, ring blocks), the S2 block mask,
// per-row log-sum-exp out and its gradient in.
//
//   forward  one block of 4 warps per (64-query tile, head, batch); each warp
//            owns 16 query rows. Key/value tiles of 64 rows stream through
//            shared memory with cp.async, double buffered; S = Q K^T and
//            O += P V on tensor cores, online softmax in fp32 (exp2 domain),
//            P reused from the S accumulators as the A operand (mma.cuh).
//   backward the interim kernels' delta pre-pass (rowsum(dO * O) - dlse),
//            then two deterministic passes without atomics: dQ per query tile
//            over key tiles (S, dP = dO V^T, dQ += dS K), and dK, dV per key
//            tile over the query tiles of every head of its GQA group
//            (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q), each
//            warp owning 16 keys. P is recomputed from lse in both passes.
// Tile pairs are skipped from per-tile position bounds computed by a pre-pass
// (causal: smallest key position after the largest query position; S2: no
// active block pair possible), so masked tiles are never loaded; per-element
// masking runs only on tiles that need it (diagonal, tails, S2).
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"

#include <cstdint>
#include <limits>

namespace loom::cuda::detail {

namespace {

using namespace ::loom::cuda::mma;
using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;      // query rows and keys per tile (16 per warp)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Row stride of a bf16 tile in shared memory: 16-byte aligned rows and
// conflict-free fragment loads (row offsets step 4 banks).
template <int kD>
constexpr int kLd = kD + 8;
template <int kD>
constexpr int kTileElems = kTile * kLd<kD>;

// ---------------------------------------------------------------- async copies

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// dst (kTile x kD, row stride kLd) <- `rows` rows of src (row stride `stride`
// elements); rows past `rows` are zero.
template <int kD>
__device__ __forceinline__ void load_tile_async(bf16* dst, const bf16* src, int64_t stride, int rows) {
  constexpr int kVecs = kD / 8;  // 16-byte vectors per row
  for (int e = threadIdx.x; e < kTile * kVecs; e += kThreads) {
    const int r = e / kVecs, c = (e % kVecs) * 8;
    const bool valid = r < rows;
    cp_async16(dst + r * kLd<kD> + c, valid ? src + r * stride + c : src, valid);
  }
}

// ---------------------------------------------------------------- masks

// Position bounds of 64-row tiles (valid rows only), from the bounds pre-pass.
struct TileBounds {
  const int64_t* q_lo = nullptr;  // (ceil(T / 64)) or null when there is no mask
  const int64_t* q_hi = nullptr;
  const int64_t* k_lo = nullptr;  // (ceil(S / 64))
  const int64_t* k_hi = nullptr;
};

// lo[t], hi[t] = min, max of pos[64 t, min(64 t + 64, count)); one warp per tile.
__global__ void __launch_bounds__(kThreads)
    flash_bounds_kernel(int64_t* __restrict__ lo, int64_t* __restrict__ hi, const int64_t* __restrict__ pos,
                        int64_t count) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (tile * kTile >= count) return;
  const int lane = threadIdx.x % 32;
  int64_t mn = std::numeric_limits<int64_t>::max(), mx = std::numeric_limits<int64_t>::min();
  for (int r = lane; r < kTile; r += 32) {
    const int64_t i = tile * kTile + r;
    if (i < count) {
      const int64_t p = pos[i];
      mn = p < mn ? p : mn;
      mx = p > mx ? p : mx;
    }
  }
  for (int o = 16; o > 0; o /= 2) {
    const int64_t a = __shfl_xor_sync(0xffffffffu, static_cast<long long>(mn), o);
    const int64_t b = __shfl_xor_sync(0xffffffffu, static_cast<long long>(mx), o);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
  if (lane == 0) {
    lo[tile] = mn;
    hi[tile] = mx;
  }
}

// False when no (query, key) pair of query tile qt and key tile kt can be
// visible to kv head hk (the tile pair is skipped). Conservative: true may
// still mean every pair is hidden (per-element masking decides).
__device__ __forceinline__ bool tiles_meet(const AttentionMask& m, const TileBounds& tb, int64_t qt, int64_t kt,
                                           int64_t hk) {
  if (m.q_pos == nullptr) return true;
  const int64_t q_lo = tb.q_lo[qt], q_hi = tb.q_hi[qt], k_lo = tb.k_lo[kt], k_hi = tb.k_hi[kt];
  if (m.causal && k_lo > q_hi) return false;
  if (m.s2_block > 0) {
    const int64_t i_lo = q_lo / m.s2_block, i_hi = q_hi / m.s2_block;
    const int64_t j_lo = k_lo / m.s2_block, j_hi = k_hi / m.s2_block;
    if (j_lo > i_hi) return false;  // every key block after every query block
    if (i_lo - j_hi >= m.s2_local && j_hi - j_lo + 1 < m.s2_stride) {  // all outside the local window
      bool strided = false;  // some key block of the range on kv head hk's strided shard
      for (int64_t J = j_lo; J <= j_hi && !strided; ++J) strided = (J + hk * m.s2_offset) % m.s2_stride == 0;
      if (!strided) return false;
    }
  }
  return true;
}

// True when every (query, key) pair of the two tiles is visible and both tiles
// are full: per-element masking can be skipped.
__device__ __forceinline__ bool tiles_unmasked(const AttentionMask& m, const TileBounds& tb, int64_t qt, int64_t kt,
                                               const AttentionDims& n) {
  if ((qt + 1) * kTile > n.T || (kt + 1) * kTile > n.S || m.s2_block > 0) return false;
  if (m.causal) return tb.k_hi[kt] <= tb.q_lo[qt];
  return true;
}

// Positions of one tile's rows in shared memory (blk and strided only under S2).
struct TilePos {
  int64_t pos[kTile];
  int64_t blk[kTile];
  bool strided[kTile];
};

// Loads rows [start, start + 64) of pos (past `count`: unused); hk for the strided flag.
__device__ __forceinline__ void load_tile_pos(TilePos& tp, const int64_t* pos, int64_t start, int64_t count,
                                              const AttentionMask& m, int64_t hk) {
  if (pos == nullptr) return;
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t i = start + r;
    const int64_t p = i < count ? pos[i] : 0;
    tp.pos[r] = p;
    if (m.s2_block > 0) {
      const int64_t J = p / m.s2_block;
      tp.blk[r] = J;
      tp.strided[r] = (J + hk * m.s2_offset) % m.s2_stride == 0;
    }
  }
}

// The CPU twin's rule for query row qr of qp and key row kr of kp (both in range).
__device__ __forceinline__ bool visible(const AttentionMask& m, const TilePos& qp, int qr, const TilePos& kp, int kr) {
  if (m.q_pos == nullptr) return true;
  if (m.causal && kp.pos[kr] > qp.pos[qr]) return false;
  if (m.s2_block > 0) {
    const int64_t I = qp.blk[qr], J = kp.blk[kr];
    if (J > I) return false;
    if (I - J < m.s2_local) return true;
    return kp.strided[kr];
  }
  return true;
}

// Element (query row qr, key row kr) of a tile pair that needs per-element
// masking is hidden: outside the valid rows (nq, nk) or not visible.
__device__ __forceinline__ bool hidden(const AttentionMask& m, const TilePos& qp, int qr, int nq, const TilePos& kp,
                                       int kr, int nk) {
  return qr >= nq || kr >= nk || !visible(m, qp, qr, kp, kr);
}

// Valid rows of the 64-row tile starting at `start` of `count` rows.
__device__ __forceinline__ int tile_rows(int64_t count, int64_t start) {
  return static_cast<int>(count - start < kTile ? count - start : kTile);
}

// Index of the first key tile >= from that query tile qt needs (tiles when none).
__device__ __forceinline__ int64_t next_key_tile(const AttentionMask& m, const TileBounds& tb, int64_t qt,
                                                 int64_t from, int64_t tiles, int64_t hk) {
  while (from < tiles && !tiles_meet(m, tb, qt, from, hk)) ++from;
  return from;
}

__device__ __forceinline__ uint32_t pack2(float a, float b) { return pack_bf16(__floats2bfloat162_rn(a, b)); }

// The A fragments (16 x 16 k-steps) of a 16 x 64 fp32 C tile held as acc[8][4].
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4][4], const float (&c)[8][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    a[kk][0] = pack2(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// acc (16 x 64) += A (16 x kD, rows row0.. of a row-major smem tile) B, with
// B[d][j] = bs[j][d] (64 rows of a row-major smem tile, n-major).
template <int kD>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[8][4], const bf16* as, int row0, const bf16* bs) {
#pragma unroll
  for (int k0 = 0; k0 < kD; k0 += 16) {
    uint32_t a[4];
    load_a(a, as, kLd<kD>, row0, k0);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t b0, b1;
      load_b_nmajor(b0, b1, bs, kLd<kD>, 8 * nt, k0);
      mma_bf16(acc[nt], a, b0, b1);
    }
  }
}

// acc (16 x kD) += A (16 x 64, as fragments) B with B = bs (64 x kD row-major smem tile, k-major).
template <int kD>
__device__ __forceinline__ void mma_frags_by_tile(float (&acc)[kD / 8][4], const uint32_t (&a)[4][4],
                                                  const bf16* bs) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      uint32_t b0, b1;
      load_b_kmajor(b0, b1, bs, kLd<kD>, 8 * nt, 16 * kk);
      mma_bf16(acc[nt], a[kk], b0, b1);
    }
}

// Stores a 16 x kD fp32 accumulator (rows row0.., times `mult`) as bf16 rows of
// dst (row stride `stride` elements); rows at or past `rows` are skipped.
template <int kD>
__device__ __forceinline__ void store_rows(bf16* dst, int64_t stride, int row0, int rows, const float (&acc)[kD / 8][4],
                                           float mult) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + 8 * half;
    if (r >= rows) continue;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt)
      *reinterpret_cast<__nv_bfloat162*>(dst + r * stride + 8 * nt + 2 * t) =
          __floats2bfloat162_rn(mult * acc[nt][2 * half], mult * acc[nt][2 * half + 1]);
  }
}

// ---------------------------------------------------------------- forward

// The query tile, head and batch of a forward or dQ block, and where its rows
// and its kv head's rows start (element offsets into q-like and k-like tensors).
struct QueryBlock {
  int64_t qt, h, b, hk, i0, tiles;  // tiles: key tiles of the sequence
  int nq;                           // valid query rows of the tile
  int64_t q_stride, kv_stride, q_offset, kv_offset;
};

__device__ __forceinline__ QueryBlock query_block(const AttentionDims& n) {
  QueryBlock blk;
  // Causal rows late in the sequence see the most keys: those tiles are scheduled first.
  blk.qt = gridDim.x - 1 - blockIdx.x;
  blk.h = blockIdx.y;
  blk.b = blockIdx.z;
  blk.hk = blk.h / (n.H / n.Hkv);
  blk.i0 = blk.qt * kTile;
  blk.tiles = (n.S + kTile - 1) / kTile;
  blk.nq = tile_rows(n.T, blk.i0);
  blk.q_stride = n.H * n.D;
  blk.kv_stride = n.Hkv * n.D;
  blk.q_offset = ((blk.b * n.T + blk.i0) * n.H + blk.h) * n.D;
  blk.kv_offset = (blk.b * n.S * n.Hkv + blk.hk) * n.D;
  return blk;
}

// Starts the async copy of key/value tile kt into stage `stage` of ks, vs and
// loads its positions into kpos[stage].
template <int kD>
__device__ __forceinline__ void issue_kv_tile(bf16* ks, bf16* vs, TilePos* kpos, const bf16* k, const bf16* v,
                                              const QueryBlock& blk, const AttentionDims& n, const AttentionMask& m,
                                              int64_t kt, int stage) {
  const int64_t j0 = kt * kTile;
  const int nk = tile_rows(n.S, j0);
  const int64_t at = blk.kv_offset + j0 * blk.kv_stride;
  load_tile_async<kD>(ks + stage * kTileElems<kD>, k + at, blk.kv_stride, nk);
  load_tile_async<kD>(vs + stage * kTileElems<kD>, v + at, blk.kv_stride, nk);
  load_tile_pos(kpos[stage], m.k_pos, j0, n.S, m, blk.hk);
}

template <int kD>
constexpr size_t forward_smem() {
  return sizeof(bf16) * 5 * kTileElems<kD> + 3 * sizeof(TilePos);  // Q, 2 x (K, V); q, 2 x k positions
}

template <int kD>
__global__ void __launch_bounds__(kThreads)
    flash_forward_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                         const bf16* __restrict__ k, const bf16* __restrict__ v, AttentionDims n, AttentionMask m,
                         TileBounds tb, float scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* ks = qs + kTileElems<kD>;       // 2 stages
  bf16* vs = ks + 2 * kTileElems<kD>;   // 2 stages
  TilePos* qpos = reinterpret_cast<TilePos*>(vs + 2 * kTileElems<kD>);
  TilePos* kpos = qpos + 1;             // 2 stages

  const QueryBlock blk = query_block(n);
  const int64_t qt = blk.qt, h = blk.h, b = blk.b, hk = blk.hk, i0 = blk.i0, tiles = blk.tiles;
  const int nq = blk.nq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;

  load_tile_async<kD>(qs, q + blk.q_offset, blk.q_stride, nq);
  cp_async_commit();
  load_tile_pos(*qpos, m.q_pos, i0, n.T, m, hk);

  auto issue = [&](int64_t kt, int stage) { issue_kv_tile<kD>(ks, vs, kpos, k, v, blk, n, m, kt, stage); };

  const float scale_log2 = scale * kLog2e;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // exp2 domain; row_sum per thread
  float acc_o[kD / 8][4] = {};
  uint32_t qf[kD / 16][4];

  int64_t kt = next_key_tile(m, tb, qt, 0, tiles, hk);
  if (kt < tiles) issue(kt, 0);
  cp_async_commit();
  int stage = 0;
  bool q_loaded = false;
  while (kt < tiles) {
    const int64_t next = next_key_tile(m, tb, qt, kt + 1, tiles, hk);
    if (next < tiles) issue(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // Q and this tile have landed
    __syncthreads();
    if (!q_loaded) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) load_a(qf[kk], qs, kLd<kD>, 16 * warp, 16 * kk);
      q_loaded = true;
    }
    const bf16* kt_s = ks + stage * kTileElems<kD>;
    const bf16* vt_s = vs + stage * kTileElems<kD>;
    float s[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        uint32_t b0, b1;
        load_b_nmajor(b0, b1, kt_s, kLd<kD>, 8 * nt, 16 * kk);
        mma_bf16(s[nt], qf[kk], b0, b1);
      }
    const bool masked = !tiles_unmasked(m, tb, qt, kt, n);
    const int nk = tile_rows(n.S, kt * kTile);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 16 * warp + g + 8 * (e / 2), c = 8 * nt + 2 * t4 + (e % 2);
        float x = s[nt][e] * scale_log2;
        if (masked && hidden(m, *qpos, r, nq, kpos[stage], c, nk)) x = -INFINITY;
        s[nt][e] = x;
      }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = row_max[half];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet
      const float alpha = exp2f(row_max[half] - base);
      row_max[half] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        s[nt][2 * half] = exp2f(s[nt][2 * half] - base);
        s[nt][2 * half + 1] = exp2f(s[nt][2 * half + 1] - base);
        sum += s[nt][2 * half] + s[nt][2 * half + 1];
      }
      row_sum[half] = row_sum[half] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        acc_o[nt][2 * half] *= alpha;
        acc_o[nt][2 * half + 1] *= alpha;
      }
    }
    uint32_t pf[4][4];
    c_to_a(pf, s);
    mma_frags_by_tile<kD>(acc_o, pf, vt_s);
    __syncthreads();  // this stage is refilled two tiles on
    kt = next;
    stage ^= 1;
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = row_sum[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[half] = l > 0.f ? 1.f / l : 0.f;
    const int r = 16 * warp + g + 8 * half;
    if (t4 == 0 && r < nq)
      lse[(b * n.H + h) * n.T + i0 + r] = l > 0.f ? row_max[half] * kLn2 + logf(l) : -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      acc_o[nt][2 * half] *= inv[half];
      acc_o[nt][2 * half + 1] *= inv[half];
    }
  }
  store_rows<kD>(out + blk.q_offset, blk.q_stride, 16 * warp, nq, acc_o, 1.f);
}

// ---------------------------------------------------------------- backward

// ---- dQ: one block per (64-query tile, head, batch); warp -> 16 query rows.

template <int kD>
constexpr size_t dq_smem() {
  return sizeof(bf16) * 6 * kTileElems<kD> + 3 * sizeof(TilePos);  // Q, dO, 2 x (K, V); positions
}

template <int kD>
__global__ void __launch_bounds__(kThreads)
    flash_backward_dq_kernel(bf16* __restrict__ dq, const bf16* __restrict__ dout, const float* __restrict__ lse,
                             const float* __restrict__ delta, const bf16* __restrict__ q, const bf16* __restrict__ k,
                             const bf16* __restrict__ v, AttentionDims n, AttentionMask m, TileBounds tb,
                             float scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* dos = qs + kTileElems<kD>;
  bf16* ks = dos + kTileElems<kD>;      // 2 stages
  bf16* vs = ks + 2 * kTileElems<kD>;   // 2 stages
  TilePos* qpos = reinterpret_cast<TilePos*>(vs + 2 * kTileElems<kD>);
  TilePos* kpos = qpos + 1;

  const QueryBlock blk = query_block(n);
  const int64_t qt = blk.qt, h = blk.h, b = blk.b, hk = blk.hk, i0 = blk.i0, tiles = blk.tiles;
  const int nq = blk.nq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;

  load_tile_async<kD>(qs, q + blk.q_offset, blk.q_stride, nq);
  load_tile_async<kD>(dos, dout + blk.q_offset, blk.q_stride, nq);
  cp_async_commit();
  load_tile_pos(*qpos, m.q_pos, i0, n.T, m, hk);

  // This lane's two rows: lse in the exp2 domain (+inf for hidden rows: p = 0) and delta.
  float lse2[2], dl[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = 16 * warp + g + 8 * half;
    const int64_t row = (b * n.H + h) * n.T + i0 + r;
    const float l = r < nq ? lse[row] : -INFINITY;
    lse2[half] = l == -INFINITY ? INFINITY : l * kLog2e;
    dl[half] = r < nq ? delta[row] : 0.f;
  }

  auto issue = [&](int64_t kt, int stage) { issue_kv_tile<kD>(ks, vs, kpos, k, v, blk, n, m, kt, stage); };

  const float scale_log2 = scale * kLog2e;
  float acc_dq[kD / 8][4] = {};
  int64_t kt = next_key_tile(m, tb, qt, 0, tiles, hk);
  if (kt < tiles) issue(kt, 0);
  cp_async_commit();
  int stage = 0;
  while (kt < tiles) {
    const int64_t next = next_key_tile(m, tb, qt, kt + 1, tiles, hk);
    if (next < tiles) issue(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* kt_s = ks + stage * kTileElems<kD>;
    const bf16* vt_s = vs + stage * kTileElems<kD>;
    float s[8][4] = {}, dp[8][4] = {};
    mma_rows_by_rows<kD>(s, qs, 16 * warp, kt_s);    // S = Q K^T
    mma_rows_by_rows<kD>(dp, dos, 16 * warp, vt_s);  // dP = dO V^T
    const bool masked = !tiles_unmasked(m, tb, qt, kt, n);
    const int nk = tile_rows(n.S, kt * kTile);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2, r = 16 * warp + g + 8 * half, c = 8 * nt + 2 * t4 + (e % 2);
        float p = exp2f(s[nt][e] * scale_log2 - lse2[half]);
        if (masked && hidden(m, *qpos, r, nq, kpos[stage], c, nk)) p = 0.f;
        dp[nt][e] = p * (dp[nt][e] - dl[half]);  // dS
      }
    uint32_t dsf[4][4];
    c_to_a(dsf, dp);
    mma_frags_by_tile<kD>(acc_dq, dsf, kt_s);  // dQ += dS K
    __syncthreads();
    kt = next;
    stage ^= 1;
  }
  cp_async_wait<0>();
  store_rows<kD>(dq + blk.q_offset, blk.q_stride, 16 * warp, nq, acc_dq, scale);
}

// ---- dK, dV: one block per (64-key tile, kv head, batch); warp -> 16 keys;
// loops over the query tiles of every query head of the GQA group.

template <int kD>
constexpr size_t dkdv_smem() {
  // K, V; 2 x (Q, dO); key positions, 2 x query positions; 2 x 64 x (lse, delta)
  return sizeof(bf16) * 6 * kTileElems<kD> + 3 * sizeof(TilePos) + 2 * 2 * kTile * sizeof(float);
}

template <int kD>
__global__ void __launch_bounds__(kThreads)
    flash_backward_dkdv_kernel(bf16* __restrict__ dk, bf16* __restrict__ dv, const bf16* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                               AttentionDims n, AttentionMask m, TileBounds tb, float scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* vs = ks + kTileElems<kD>;
  bf16* qs = vs + kTileElems<kD>;       // 2 stages
  bf16* dos = qs + 2 * kTileElems<kD>;  // 2 stages
  TilePos* kpos = reinterpret_cast<TilePos*>(dos + 2 * kTileElems<kD>);
  TilePos* qpos = kpos + 1;             // 2 stages
  float* lse2_s = reinterpret_cast<float*>(qpos + 2);  // 2 stages x 64, exp2 domain (+inf: hidden row)
  float* delta_s = lse2_s + 2 * kTile;                 // 2 stages x 64

  const int64_t kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int64_t group = n.H / n.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int64_t j0 = kt * kTile;
  const int nk = tile_rows(n.S, j0);
  const int64_t q_stride = n.H * n.D, kv_stride = n.Hkv * n.D;
  const int64_t qtiles = (n.T + kTile - 1) / kTile;
  const int64_t units = group * qtiles;  // (query head of the group, query tile)

  load_tile_async<kD>(ks, k + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, nk);
  load_tile_async<kD>(vs, v + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, nk);
  cp_async_commit();
  load_tile_pos(*kpos, m.k_pos, j0, n.S, m, hk);

  auto next_unit = [&](int64_t from) {
    while (from < units && !tiles_meet(m, tb, from % qtiles, kt, hk)) ++from;
    return from;
  };
  auto issue = [&](int64_t unit, int stage) {
    const int64_t h = hk * group + unit / qtiles, i0 = (unit % qtiles) * kTile;
    const int nq = tile_rows(n.T, i0);
    const int64_t at = ((b * n.T + i0) * n.H + h) * n.D;
    load_tile_async<kD>(qs + stage * kTileElems<kD>, q + at, q_stride, nq);
    load_tile_async<kD>(dos + stage * kTileElems<kD>, dout + at, q_stride, nq);
    load_tile_pos(qpos[stage], m.q_pos, i0, n.T, m, hk);
    for (int r = threadIdx.x; r < kTile; r += kThreads) {
      const int64_t row = (b * n.H + h) * n.T + i0 + r;
      const float l = r < nq ? lse[row] : -INFINITY;
      lse2_s[stage * kTile + r] = l == -INFINITY ? INFINITY : l * kLog2e;
      delta_s[stage * kTile + r] = r < nq ? delta[row] : 0.f;
    }
  };

  const float scale_log2 = scale * kLog2e;
  float acc_dk[kD / 8][4] = {}, acc_dv[kD / 8][4] = {};
  int64_t unit = next_unit(0);
  if (unit < units) issue(unit, 0);
  cp_async_commit();
  int stage = 0;
  while (unit < units) {
    const int64_t next = next_unit(unit + 1);
    if (next < units) issue(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int64_t qt = unit % qtiles;
    const int nq = tile_rows(n.T, qt * kTile);
    const bf16* qt_s = qs + stage * kTileElems<kD>;
    const bf16* dot_s = dos + stage * kTileElems<kD>;
    const float* l2 = lse2_s + stage * kTile;
    const float* dl = delta_s + stage * kTile;
    float st[8][4] = {}, dpt[8][4] = {};           // rows: this warp's 16 keys; columns: the 64 queries
    mma_rows_by_rows<kD>(st, ks, 16 * warp, qt_s);    // S^T = K Q^T
    mma_rows_by_rows<kD>(dpt, vs, 16 * warp, dot_s);  // dP^T = V dO^T
    const bool masked = !tiles_unmasked(m, tb, qt, kt, n);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kr = 16 * warp + g + 8 * (e / 2), qc = 8 * nt + 2 * t4 + (e % 2);
        float p = exp2f(st[nt][e] * scale_log2 - l2[qc]);
        if (masked && hidden(m, qpos[stage], qc, nq, *kpos, kr, nk)) p = 0.f;
        st[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - dl[qc]);  // dS^T
      }
    uint32_t pf[4][4], dsf[4][4];
    c_to_a(pf, st);
    c_to_a(dsf, dpt);
    mma_frags_by_tile<kD>(acc_dv, pf, dot_s);  // dV += P^T dO
    mma_frags_by_tile<kD>(acc_dk, dsf, qt_s);  // dK += dS^T Q
    __syncthreads();
    unit = next;
    stage ^= 1;
  }
  cp_async_wait<0>();
  store_rows<kD>(dk + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, 16 * warp, nk, acc_dk, scale);
  store_rows<kD>(dv + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, 16 * warp, nk, acc_dv, 1.f);
}

// ---------------------------------------------------------------- launches

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename Fn>
void dispatch_flash_head_dim(int64_t D, Fn&& fn) {
  if (D == 64) fn(std::integral_constant<int, 64>{});
  else if (D == 128) fn(std::integral_constant<int, 128>{});
  else LOOM_FAIL() << "flash attention (CUDA): head dim D = " << D << " is not 64 or 128";
}

unsigned tiles_of(int64_t rows) { return static_cast<unsigned>((rows + kTile - 1) / kTile); }

// The tile bounds of q and k positions into `scratch` (2 * (T tiles + S tiles) i64).
TileBounds compute_bounds(int64_t* scratch, const AttentionDims& n, const AttentionMask& m, cudaStream_t stream) {
  TileBounds tb;
  if (m.q_pos == nullptr) return tb;
  const int64_t qt = tiles_of(n.T), kt = tiles_of(n.S);
  int64_t* q_lo = scratch;
  int64_t* q_hi = q_lo + qt;
  int64_t* k_lo = q_hi + qt;
  int64_t* k_hi = k_lo + kt;
  if (qt > 0) {
    flash_bounds_kernel<<<static_cast<unsigned>((qt + kWarps - 1) / kWarps), kThreads, 0, stream>>>(q_lo, q_hi,
                                                                                                   m.q_pos, n.T);
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  if (kt > 0) {
    flash_bounds_kernel<<<static_cast<unsigned>((kt + kWarps - 1) / kWarps), kThreads, 0, stream>>>(k_lo, k_hi,
                                                                                                   m.k_pos, n.S);
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  tb.q_lo = q_lo;
  tb.q_hi = q_hi;
  tb.k_lo = k_lo;
  tb.k_hi = k_hi;
  return tb;
}

}  // namespace

bool flash_attention_supports(DType dtype, int64_t D) { return dtype == DType::bf16 && (D == 64 || D == 128); }

int64_t flash_attention_scratch(const AttentionDims& n) { return 2 * (tiles_of(n.T) + tiles_of(n.S)); }

void launch_flash_attention_forward(void* out, float* lse, const void* q, const void* k, const void* v,
                                    int64_t* scratch, const AttentionDims& n, const AttentionMask& mask,
                                    float scale, cudaStream_t stream) {
  if (n.B == 0 || n.H == 0 || n.T == 0) return;
  const TileBounds tb = compute_bounds(scratch, n, mask, stream);
  dispatch_flash_head_dim(n.D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    auto kernel = flash_forward_kernel<kD>;
    set_smem(kernel, forward_smem<kD>());
    dim3 grid(tiles_of(n.T), static_cast<unsigned>(n.H), static_cast<unsigned>(n.B));
    kernel<<<grid, kThreads, forward_smem<kD>(), stream>>>(static_cast<bf16*>(out), lse,
                                                           static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                                                           static_cast<const bf16*>(v), n, mask, tb, scale);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void launch_flash_attention_backward(void* dq, void* dk, void* dv, float* delta, int64_t* scratch, const void* dout,
                                     const float* dlse, const void* q, const void* k, const void* v,
                                     const void* out, const float* lse, const AttentionDims& n,
                                     const AttentionMask& mask, float scale, cudaStream_t stream) {
  if (n.B == 0 || n.H == 0) return;
  launch_attention_delta(DType::bf16, delta, dout, out, dlse, n, stream);
  const TileBounds tb = compute_bounds(scratch, n, mask, stream);
  dispatch_flash_head_dim(n.D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    if (n.T > 0) {
      auto kernel = flash_backward_dq_kernel<kD>;
      set_smem(kernel, dq_smem<kD>());
      dim3 grid(tiles_of(n.T), static_cast<unsigned>(n.H), static_cast<unsigned>(n.B));
      kernel<<<grid, kThreads, dq_smem<kD>(), stream>>>(
          static_cast<bf16*>(dq), static_cast<const bf16*>(dout), lse, delta, static_cast<const bf16*>(q),
          static_cast<const bf16*>(k), static_cast<const bf16*>(v), n, mask, tb, scale);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
    if (n.S > 0) {
      auto kernel = flash_backward_dkdv_kernel<kD>;
      set_smem(kernel, dkdv_smem<kD>());
      dim3 grid(tiles_of(n.S), static_cast<unsigned>(n.Hkv), static_cast<unsigned>(n.B));
      kernel<<<grid, kThreads, dkdv_smem<kD>(), stream>>>(
          static_cast<bf16*>(dk), static_cast<bf16*>(dv), static_cast<const bf16*>(dout), lse, delta,
          static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v), n, mask, tb, scale);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
  });
}

}  // namespace loom::cuda::detail
