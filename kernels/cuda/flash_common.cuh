// Pieces shared by the flash attention kernels (flash_attention.cu: forward,
// dQ and the mma.sync dK dV kernels; flash_sm90.cu: the warpgroup
// dK dV kernel): tile sizes, asynchronous row loads, the position masks and
// the per-block tile plan, warp-level products on mma.sync fragments, the
// row stores and atomics, and the launch helpers.
#pragma once

#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/attention_mask.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/key_blocks.h"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/wgmma.cuh"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace loom::cuda::detail::flash {


using namespace ::loom::cuda::mma;
using bf16 = __nv_bfloat16;

constexpr int kWarps = 8;                 // per block of the main kernels
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockRows = 16 * kWarps;   // query rows (forward, dQ) or keys (dK dV) per block: 2 tiles
constexpr int kBoundsThreads = 128;       // bounds pre-pass: one warp per tile
constexpr float kLog2e = 1.4426950408889634f;

// Row stride of a bf16 tile in shared memory: 16-byte aligned rows and
// conflict-free ldmatrix (row offsets step 4 banks).
template <int kD>
constexpr int kLd = kD + 8;
template <int kD, int kRows = kTile>
constexpr int kTileElems = kRows * kLd<kD>;

// ---------------------------------------------------------------- async copies

// dst (kRows x kD, row stride kLd) <- `rows` rows of src (row stride `stride`
// elements); rows past `rows` are zero.
template <int kD, int kRows, int kT = kThreads>
__device__ __forceinline__ void load_rows_async(bf16* dst, const bf16* src, int64_t stride, int rows) {
  constexpr int kVecs = kD / 8;  // 16-byte vectors per row
#pragma unroll
  for (int e = threadIdx.x; e < kRows * kVecs; e += kT) {
    const int r = e / kVecs, c = (e % kVecs) * 8;
    const bool valid = r < rows;
    cp_async16(dst + r * kLd<kD> + c, valid ? src + r * stride + c : src, valid);
  }
}

// dst[r] <- src[start + r] for r < kRows (past `count`: zero); 4- or 8-byte elements.
template <int kRows, int kT = kThreads, typename T>
__device__ __forceinline__ void load_vec_async(T* dst, const T* src, int64_t start, int64_t count) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8);
  for (int r = threadIdx.x; r < kRows; r += kT) {
    const bool valid = start + r < count;
    const T* from = valid ? src + start + r : src;
    if constexpr (sizeof(T) == 8) cp_async8(dst + r, from, valid);
    else cp_async4(dst + r, from, valid);
  }
}

// dst (wgmma.cuh panel tile of kRows rows x kD) <- `rows` rows of src (row stride `stride`);
// rows past `rows` are zero.
// kPanelRows > kRows: the rows go to the first kRows rows of a taller tile (dst + 64 r0 for rows
// from r0, r0 a multiple of 8).
template <int kD, int kRows, int kT = kThreads, int kPanelRows = kRows>
__device__ __forceinline__ void load_panels_async(bf16* dst, const bf16* src, int64_t stride, int rows) {
  constexpr int kVecs = kD / 8;
#pragma unroll
  for (int e = threadIdx.x; e < kRows * kVecs; e += kT) {
    const int r = e / kVecs, c = (e % kVecs) * 8;
    const bool valid = r < rows;
    cp_async16(dst + wgmma::panel_index(r, c, kPanelRows), valid ? src + r * stride + c : src, valid);
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


// False when no (query, key) pair of query tile qt and key tile kt can be
// visible to kv head hk (the tile pair is skipped). Conservative: true may
// still mean every pair is hidden (per-element masking decides).
__device__ __forceinline__ bool tiles_meet(const AttentionMask& m, const TileBounds& tb, int64_t qt, int64_t kt,
                                           int64_t hk) {
  if (m.q_pos == nullptr) return true;
  const int64_t q_lo = tb.q_lo[qt], q_hi = tb.q_hi[qt], k_lo = tb.k_lo[kt], k_hi = tb.k_hi[kt];
  if (m.causal && k_lo > q_hi) return false;
  if (m.s2_block > 0) {
    const int64_t i_lo = div_pos(q_lo, m.s2_block), i_hi = div_pos(q_hi, m.s2_block);
    const int64_t j_lo = div_pos(k_lo, m.s2_block), j_hi = div_pos(k_hi, m.s2_block);
    if (j_lo > i_hi) return false;  // every key block after every query block
    if (i_lo - j_hi >= m.s2_local && j_hi - j_lo + 1 < m.s2_stride) {  // all outside the local window
      bool strided = false;  // some key block of the range on kv head hk's strided shard
      for (int64_t J = j_lo; J <= j_hi && !strided; ++J) strided = s2_strided(m, J, hk);
      if (!strided) return false;
    }
  }
  return true;
}

// True when every (query, key) pair of the two tiles is visible and both tiles
// are full: per-element masking can be skipped. Under S2 that needs each tile
// inside one S2 block and that block pair visible.
__device__ __forceinline__ bool tiles_unmasked(const AttentionMask& m, const TileBounds& tb, int64_t qt, int64_t kt,
                                               const AttentionDims& n, int64_t hk) {
  if ((qt + 1) * kTile > n.T || (kt + 1) * kTile > n.S) return false;
  if (m.q_pos == nullptr) return true;
  const int64_t q_lo = tb.q_lo[qt], k_hi = tb.k_hi[kt];
  if (m.causal && k_hi > q_lo) return false;
  if (m.s2_block > 0) {
    const int64_t I = div_pos(q_lo, m.s2_block), J = div_pos(tb.k_lo[kt], m.s2_block);
    if (div_pos(tb.q_hi[qt], m.s2_block) != I || div_pos(k_hi, m.s2_block) != J || J > I) return false;
    return I - J < m.s2_local || s2_strided(m, J, hk);
  }
  return true;
}

// Positions of a block's or a tile's rows in shared memory (blk and strided
// filled by fill_s2, only under S2).
template <int kRows>
struct RowPos {
  int64_t pos[kRows];
  int64_t blk[kRows];
  bool strided[kRows];
};

template <int kRows, int kT = kThreads>
__device__ __forceinline__ void fill_s2(RowPos<kRows>& rp, const AttentionMask& m, int64_t hk) {
  for (int r = threadIdx.x; r < kRows; r += kT) {
    const int64_t J = div_pos(rp.pos[r], m.s2_block);
    rp.blk[r] = J;
    rp.strided[r] = s2_strided(m, J, hk);
  }
}

// The CPU twin's rule for query row qr of qp and key row kr of kp.
template <int kQ, int kK>
__device__ __forceinline__ bool visible(const AttentionMask& m, const RowPos<kQ>& qp, int qr, const RowPos<kK>& kp,
                                        int kr) {
  if (m.q_pos == nullptr) return true;
  return pair_visible(m, qp.pos[qr], kp.pos[kr], qp.blk[qr], kp.blk[kr], kp.strided[kr]);
}

// Element (query row qr, key row kr) of a tile pair that needs per-element
// masking is hidden: outside the valid rows (nq, nk) or not visible.
template <int kQ, int kK>
__device__ __forceinline__ bool hidden(const AttentionMask& m, const RowPos<kQ>& qp, int qr, int nq,
                                       const RowPos<kK>& kp, int kr, int nk) {
  return qr >= nq || kr >= nk || !visible(m, qp, qr, kp, kr);
}

// Valid rows of the `rows`-row block or tile starting at `start` of `count` rows.
__device__ __forceinline__ int rows_from(int64_t count, int64_t start, int rows) {
  return static_cast<int>(count - start < rows ? count - start : rows);
}

// ---------------------------------------------------------------- tile plan

// Bit masks, in shared memory, over the `count` tiles a block walks: meet[h]
// (tile pair can be visible for half h of the block's rows) and plain[h] (no
// per-element mask needed), h = 0, 1 for the block's two 64-row tiles.
struct TilePlan {
  uint32_t* bits;  // 4 x words: meet0, meet1, plain0, plain1
  int64_t count, words;

  __device__ bool meet(int half, int64_t t) const { return (bits[half * words + t / 32] >> (t % 32)) & 1u; }
  __device__ bool plain(int half, int64_t t) const {
    return (bits[(2 + half) * words + t / 32] >> (t % 32)) & 1u;
  }
  // The first tile >= from that either half meets (count when none).
  __device__ int64_t next(int64_t from) const {
    if (from >= count) return count;
    int64_t w = from / 32;
    uint32_t word = (bits[w] | bits[words + w]) & (~0u << (from % 32));
    while (word == 0) {
      if (++w >= words) return count;
      word = bits[w] | bits[words + w];
    }
    return 32 * w + __ffs(word) - 1;
  }
  // The last tile <= from that either half meets (-1 when none).
  __device__ int64_t prev(int64_t from) const {
    if (from < 0) return -1;
    int64_t w = from / 32;
    uint32_t word = (bits[w] | bits[words + w]) & (~0u >> (31 - from % 32));
    while (word == 0) {
      if (--w < 0) return -1;
      word = bits[w] | bits[words + w];
    }
    return 32 * w + 31 - __clz(word);
  }
};

__host__ __device__ constexpr int64_t plan_words(int64_t count) { return (count + 31) / 32; }

// Builds the plan (one ballot per 32 tiles) with kT threads; fn(half, t, meet, plain) decides a tile.
// Ends with a barrier.
template <int kT = kThreads, typename Decide>
__device__ __forceinline__ TilePlan build_plan(uint32_t* bits, int64_t count, Decide decide) {
  TilePlan plan{bits, count, plan_words(count)};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t w = warp; w < plan.words; w += kT / 32) {
    const int64_t t = 32 * w + lane;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      bool meet = false, plain = false;
      if (t < count) decide(half, t, meet, plain);
      const uint32_t m = __ballot_sync(0xffffffffu, meet), p = __ballot_sync(0xffffffffu, meet && plain);
      if (lane == 0) {
        bits[half * plan.words + w] = m;
        bits[(2 + half) * plan.words + w] = p;
      }
    }
  }
  __syncthreads();
  return plan;
}

__host__ __device__ constexpr size_t plan_bytes(int64_t count) { return 4 * sizeof(uint32_t) * plan_words(count); }

// ---------------------------------------------------------------- warp products

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

// acc (16 x 64) += A B with A = 16 x kD fragments in registers and
// B[d][j] = bs[j][d] (64 rows of a row-major smem tile, n-major).
template <int kD>
__device__ __forceinline__ void mma_frags_by_rows(float (&acc)[8][4], const uint32_t (&a)[kD / 16][4],
                                                  const bf16* bs) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_b2_nmajor(b, bs, kLd<kD>, 16 * np, 16 * kk);
      mma_bf16(acc[2 * np], a[kk], b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
}

// The same with A read from rows row0.. of a row-major smem tile (as).
template <int kD>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[8][4], const bf16* as, int row0, const bf16* bs) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t a[4];
    ldsm_a(a, as, kLd<kD>, row0, 16 * kk);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_b2_nmajor(b, bs, kLd<kD>, 16 * np, 16 * kk);
      mma_bf16(acc[2 * np], a, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
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
    for (int np = 0; np < kD / 16; ++np) {
      uint32_t b[4];
      ldsm_b2_kmajor(b, bs, kLd<kD>, 16 * np, 16 * kk);
      mma_bf16(acc[2 * np], a[kk], b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a[kk], b[2], b[3]);
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

// The forward's output rows (offset: the block's first element, stride: between rows): o, or
// with a gate o * sigmoid(z) * w in fp32 before the bf16 rounding, and o also into
// gate.ungated where set (attention_launch.h: AttentionGate). A row's (token, head) index, the
// per-row gate's, is its first element / kD.
template <int kD>
__device__ __forceinline__ void store_out_rows(bf16* out, const AttentionGate& gate, int64_t offset, int64_t stride,
                                               int row0, int rows, const float (&acc)[kD / 8][4]) {
  if (!gate.any()) return store_rows<kD>(out + offset, stride, row0, rows, acc, 1.f);
  if (gate.ungated != nullptr) store_rows<kD>(static_cast<bf16*>(gate.ungated) + offset, stride, row0, rows, acc, 1.f);
  const bf16* z = static_cast<const bf16*>(gate.z);
  const bf16* w = static_cast<const bf16*>(gate.w);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + 8 * half;
    if (r >= rows) continue;
    const int64_t at = offset + r * stride;
    float row_gate = w != nullptr ? __bfloat162float(w[at / kD]) : 1.f;
    if (z != nullptr && gate.z_per_row) row_gate *= sigmoidf(__bfloat162float(z[at / kD]));
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      const int64_t e = at + 8 * nt + 2 * t;
      float g0 = row_gate, g1 = row_gate;
      if (z != nullptr && !gate.z_per_row) {
        const float2 ze = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(z + e));
        g0 *= sigmoidf(ze.x);
        g1 *= sigmoidf(ze.y);
      }
      *reinterpret_cast<__nv_bfloat162*>(out + e) =
          __floats2bfloat162_rn(g0 * acc[nt][2 * half], g1 * acc[nt][2 * half + 1]);
    }
  }
}


// A block's (row block, head): the grid is (heads, blocks, B), heads varying fastest,
// so every head's longest blocks start before any head's shortest and the last wave
// holds the shortest (measured at 32K against (blocks, heads, B): S2 fwd+bwd 18.5
// against 20.9 ms, dense even; kernels/NOTES.md). kTile, BlockSlot: key_blocks.h.
__device__ __forceinline__ BlockSlot block_slot() { return {blockIdx.y, blockIdx.x}; }

// ---------------------------------------------------------------- query blocks (forward, dQ)

// The 128-query block, head and batch of a forward or dQ block, and where its
// rows and its kv head's rows start (element offsets into q-like and k-like tensors).
struct QueryBlock {
  int64_t qb, h, b, hk, i0, tiles;  // tiles: key tiles of the sequence
  int nq;                           // valid query rows of the block
  int64_t q_stride, kv_stride, q_offset, kv_offset;
};

__device__ __forceinline__ QueryBlock query_block(const AttentionDims& n) {
  QueryBlock blk;
  // Causal rows late in the sequence see the most keys: those blocks are scheduled first,
  // every head's before the next (heads vary fastest: the last wave holds the shortest blocks).
  const BlockSlot slot = block_slot();
  blk.qb = gridDim.y - 1 - slot.block;
  blk.h = slot.head;
  blk.b = blockIdx.z;
  blk.hk = blk.h / (n.H / n.Hkv);
  blk.i0 = blk.qb * kBlockRows;
  blk.tiles = (n.S + kTile - 1) / kTile;
  blk.nq = rows_from(n.T, blk.i0, kBlockRows);
  blk.q_stride = n.H * n.D;
  blk.kv_stride = n.Hkv * n.D;
  blk.q_offset = ((blk.b * n.T + blk.i0) * n.H + blk.h) * n.D;
  blk.kv_offset = (blk.b * n.S * n.Hkv + blk.hk) * n.D;
  return blk;
}

// The plan of a query block over the key tiles (kT threads).
template <int kT = kThreads>
__device__ __forceinline__ TilePlan query_block_plan(uint32_t* bits, const QueryBlock& blk, const AttentionDims& n,
                                                     const AttentionMask& m, const TileBounds& tb) {
  const int64_t q_tiles = (n.T + kTile - 1) / kTile;
  return build_plan<kT>(bits, blk.tiles, [&](int half, int64_t kt, bool& meet, bool& plain) {
    const int64_t qt = 2 * blk.qb + half;
    if (qt >= q_tiles) return;
    meet = tiles_meet(m, tb, qt, kt, blk.hk);
    plain = tiles_unmasked(m, tb, qt, kt, n, blk.hk);
  });
}

// Shared memory of a query block: the block's rows (kRowSets tiles of 128
// rows: Q, or Q and dO), kStages stages of K and V tiles, positions, then the
// plan. Tiles are padded rows (kLd, for fragment loads) or, with kPanels,
// wgmma.cuh's panel tiles from a 1024-byte aligned base (for warpgroup products).
template <int kD, int kRowSets, bool kPanels = false, int kStageCount = 2>
struct QuerySmem {
  static constexpr bool kPanelTiles = kPanels;
  static constexpr int kStages = kStageCount;
  static constexpr int kRowElems = kPanels ? kBlockRows * kD : kTileElems<kD, kBlockRows>;  // one row set
  static constexpr int kKvElems = kPanels ? kTile * kD : kTileElems<kD>;                     // one K or V stage
  static constexpr size_t kRowsBytes = sizeof(bf16) * kRowSets * kRowElems;
  static constexpr size_t kKvBytes = sizeof(bf16) * 2 * kStages * kKvElems;
  static constexpr size_t kBase = kRowsBytes + kKvBytes + sizeof(RowPos<kBlockRows>) + kStages * sizeof(RowPos<kTile>);
  static size_t bytes(int64_t key_tiles) { return (kPanels ? 1024 : 0) + kBase + plan_bytes(key_tiles); }

  bf16* rows;  // kRowSets x 128 rows
  bf16* ks;    // kStages stages
  bf16* vs;    // kStages stages
  RowPos<kBlockRows>* qpos;
  RowPos<kTile>* kpos;  // kStages stages
  uint32_t* plan;

  __device__ explicit QuerySmem(unsigned char* raw) {
    if constexpr (kPanels) raw += (1024 - (smem_addr(raw) & 1023)) & 1023;
    rows = reinterpret_cast<bf16*>(raw);
    ks = rows + kRowSets * kRowElems;
    vs = ks + kStages * kKvElems;
    qpos = reinterpret_cast<RowPos<kBlockRows>*>(vs + kStages * kKvElems);
    kpos = reinterpret_cast<RowPos<kTile>*>(qpos + 1);
    plan = reinterpret_cast<uint32_t*>(kpos + kStages);
  }

  // Starts the async copies of `rows` rows of src (row stride `stride`) into a kRows-row tile.
  template <int kRows>
  static __device__ void load(bf16* dst, const bf16* src, int64_t stride, int rows) {
    if constexpr (kPanels) load_panels_async<kD, kRows>(dst, src, stride, rows);
    else load_rows_async<kD, kRows>(dst, src, stride, rows);
  }
};

// Starts the async copies of key/value tile kt and its positions into stage `stage`.
template <typename Smem>
__device__ __forceinline__ void issue_kv_tile(const Smem& sm, const bf16* k, const bf16* v, const QueryBlock& blk,
                                              const AttentionDims& n, const AttentionMask& m, int64_t kt, int stage) {
  const int64_t j0 = kt * kTile;
  const int nk = rows_from(n.S, j0, kTile);
  const int64_t at = blk.kv_offset + j0 * blk.kv_stride;
  Smem::template load<kTile>(sm.ks + stage * Smem::kKvElems, k + at, blk.kv_stride, nk);
  Smem::template load<kTile>(sm.vs + stage * Smem::kKvElems, v + at, blk.kv_stride, nk);
  if (m.q_pos != nullptr) load_vec_async<kTile>(sm.kpos[stage].pos, m.k_pos, j0, n.S);
}

// Starts a query block: the async copies of its 128 rows of `rows` (Q) and their positions
// (the first commit group), then its plan over the key tiles (ends with a barrier).
template <typename Smem>
__device__ __forceinline__ TilePlan start_query_block(const Smem& sm, const bf16* rows, const QueryBlock& blk,
                                                      const AttentionDims& n, const AttentionMask& m,
                                                      const TileBounds& tb) {
  Smem::template load<kBlockRows>(sm.rows, rows + blk.q_offset, blk.q_stride, blk.nq);
  if (m.q_pos != nullptr) load_vec_async<kBlockRows>(sm.qpos->pos, m.q_pos, blk.i0, n.T);
  cp_async_commit();
  return query_block_plan(sm.plan, blk, n, m, tb);
}

// Walks the key tiles of a query block's plan, one tile ahead over Smem::kStages
// buffers: body(kt, stage, first) runs once the tile is in shared memory (after a
// barrier), and S2 block ids are filled first where a half needs per-element masking.
// The block's own rows (issued before the call, in the first commit group) land
// before the first body.
template <typename Smem, typename Body>
__device__ __forceinline__ void walk_key_tiles(const Smem& sm, const TilePlan& plan, const bf16* k, const bf16* v,
                                               const QueryBlock& blk, const AttentionDims& n, const AttentionMask& m,
                                               Body body) {
  int64_t kt = plan.next(0);
  if (kt < plan.count) issue_kv_tile(sm, k, v, blk, n, m, kt, 0);
  cp_async_commit();
  int stage = 0;
  bool first = true;
  while (kt < plan.count) {
    const int64_t next = plan.next(kt + 1);
    const int next_stage = stage + 1 == Smem::kStages ? 0 : stage + 1;
    if (next < plan.count) issue_kv_tile(sm, k, v, blk, n, m, next, next_stage);
    cp_async_commit();
    cp_async_wait<1>();  // the block's rows and this tile have landed
    if constexpr (Smem::kPanelTiles) wgmma::fence_smem();  // visible to the warpgroup products
    __syncthreads();
    if (m.s2_block > 0) {
      const bool tile_masked = !(plan.plain(0, kt) && plan.plain(1, kt));
      if (first || tile_masked) {
        if (first) fill_s2(*sm.qpos, m, blk.hk);
        if (tile_masked) fill_s2(sm.kpos[stage], m, blk.hk);
        __syncthreads();
      }
    }
    body(kt, stage, first);
    __syncthreads();  // this stage is refilled kStages tiles on
    first = false;
    kt = next;
    stage = next_stage;
  }
  cp_async_wait<0>();
}

// Query-row tiles of the forward: a warp's 16 query rows (row0 + g and + 8) by a 64-key tile
// (columns 8 nt + 2 t4 and + 1) of scores, as m16n8 accumulators.

// Hidden scores to -inf (valid rows nq and nk; positions qp, kp). kKeyRows: a key-row tile (rows
// row0.. are keys, columns queries) of the dK dV kernels instead.
template <bool kKeyRows = false, int kQ, int kK>
__device__ __forceinline__ void mask_scores(float (&s)[8][4], const AttentionMask& m, const RowPos<kQ>& qp, int row0,
                                            int nq, const RowPos<kK>& kp, int nk) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + g + 8 * (e / 2), c = 8 * nt + 2 * t4 + (e % 2);
      if (kKeyRows ? hidden(m, qp, c, nq, kp, r, nk) : hidden(m, qp, r, nq, kp, c, nk)) s[nt][e] = -INFINITY;
    }
}

// One tile of the online softmax without the output: scores s become p = 2^(s scale_log2 -
// running max), the running maxima (of raw scores) and this thread's part of the row sums are
// updated, and alpha[hr] is the factor that rescales the output rows to the new maxima.
__device__ __forceinline__ void softmax_tile(float (&s)[8][4], float (&row_max)[2], float (&row_sum)[2],
                                             float (&alpha)[2], float scale_log2) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float mx = row_max[hr];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx * scale_log2;  // a row with nothing visible yet
    // Exactly 1 while the maximum holds (the fmaf would leave the rounding residual of
    // row_max * scale_log2, a bias in l that grows with the number of tiles).
    alpha[hr] = mx == row_max[hr] ? 1.f : fast_exp2(fmaf(row_max[hr], scale_log2, -base));
    row_max[hr] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      s[nt][2 * hr] = fast_exp2(fmaf(s[nt][2 * hr], scale_log2, -base));
      s[nt][2 * hr + 1] = fast_exp2(fmaf(s[nt][2 * hr + 1], scale_log2, -base));
      sum += s[nt][2 * hr] + s[nt][2 * hr + 1];
    }
    row_sum[hr] = row_sum[hr] * alpha[hr] + sum;
  }
}

// The output rows (this thread's two) times alpha.
template <int kD>
__device__ __forceinline__ void rescale_rows(float (&acc_o)[kD / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr)
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      acc_o[nt][2 * hr] *= alpha[hr];
      acc_o[nt][2 * hr + 1] *= alpha[hr];
    }
}

// One tile of the online softmax with the output: softmax_tile, then the rescale.
template <int kD>
__device__ __forceinline__ void online_softmax(float (&s)[8][4], float (&row_max)[2], float (&row_sum)[2],
                                               float (&acc_o)[kD / 8][4], float scale_log2) {
  float alpha[2];
  softmax_tile(s, row_max, row_sum, alpha, scale_log2);
  rescale_rows<kD>(acc_o, alpha);
}

// The end of the online softmax: lse of the rows (natural log, -inf for a row that saw nothing;
// `lse` points at the block's first row) and acc_o divided by the row sums.
template <int kD>
__device__ __forceinline__ void finish_query_rows(float (&acc_o)[kD / 8][4], float* lse, const float (&row_max)[2],
                                                  const float (&row_sum)[2], int row0, int nq, float scale) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = row_sum[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int r = row0 + g + 8 * hr;
    if (t4 == 0 && r < nq) lse[r] = l > 0.f ? row_max[hr] * scale + logf(l) : -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt) {
      acc_o[nt][2 * hr] *= inv;
      acc_o[nt][2 * hr + 1] *= inv;
    }
  }
}

// ---------------------------------------------------------------- backward helpers

// lse in the exp2 domain, +inf for a row that sees nothing (its p is 0).
__device__ __forceinline__ float lse_exp2(float l) { return l == -INFINITY ? INFINITY : l * kLog2e; }

// *p += a, *(p + 1) += b as one vector atomic where the device has it (sm_90).
__device__ __forceinline__ void add_pair(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// The dK dV block this one runs in s2_block_order's launch order (key_blocks.h), on the grid
// (heads, blocks per head, B).
__device__ __forceinline__ BlockSlot s2_block_slot(int64_t S, int64_t pair, int64_t offset) {
  return s2_block_order(int64_t{blockIdx.y} * gridDim.x + blockIdx.x, gridDim.y, gridDim.x, S, pair, offset);
}

// A dK dV block's unit: head g of the GQA group (0..group-1) and query tile t.
struct QueryUnit {
  int g, t;
};

// A dK dV block: (key block, kv head, batch) from block_slot (low key blocks, the longest
// under causal, first) or s2_block_slot, its keys (key_tiles_of), and its units: (query head of
// the GQA group, query tile) in that order, walked where either of the block's 64-key halves meets
// the query tile.
struct KeyBlock {
  int64_t kb, hk, b, group, j0, q_tiles, k_tiles, q_stride, kv_stride, kv_offset;
  int nk;    // valid keys of the block (contiguous), or all of them (paired halves are whole tiles)
  int step;  // tiles from the first half to the second

  // pair > 1 (S2 blocks of one tile, vert_stride = pair, 128 keys: key_tiles_of's pairs within
  // chunks of 2 pair tiles): s2_block_slot's order with the mask's s2_offset.
  __device__ KeyBlock(const AttentionDims& n, int keys, int64_t pair = 1, int64_t s2_offset = 0) {
    const BlockSlot slot = keys == 2 * kTile && pair > 1 ? s2_block_slot(n.S, pair, s2_offset) : block_slot();
    kb = slot.block;
    hk = slot.head;
    b = blockIdx.z;
    group = n.H / n.Hkv;
    q_tiles = (n.T + kTile - 1) / kTile;
    k_tiles = (n.S + kTile - 1) / kTile;
    const bool paired = keys == 2 * kTile && pair > 1;
    const KeyTiles tiles = key_tiles_of(kb, keys, n.S, pair, paired ? s2_strided_index(hk, s2_offset, pair) : -1);
    j0 = tiles.t0 * kTile;
    step = static_cast<int>(tiles.step);
    nk = step == 1 ? rows_from(n.S, j0, keys) : keys;
    q_stride = n.H * n.D;
    kv_stride = n.Hkv * n.D;
    kv_offset = ((b * n.S + j0) * n.Hkv + hk) * n.D;
  }
  // First key, valid keys (may be <= 0) and element offset in k-like tensors of half h.
  __device__ int64_t half_j0(int h) const { return j0 + int64_t{h} * step * kTile; }
  __device__ int half_nk(const AttentionDims& n, int h) const { return rows_from(n.S, half_j0(h), kTile); }
  __device__ int64_t half_offset(int h) const {
    return kv_offset + (half_j0(h) - j0) * kv_stride;
  }

  // The plan over the query tiles for the block's kHalves 64-key halves (ends with a barrier).
  template <int kT, int kHalves>
  __device__ TilePlan plan(uint32_t* bits, const AttentionDims& n, const AttentionMask& m,
                           const TileBounds& tb) const {
    return build_plan<kT>(bits, q_tiles, [&](int hf, int64_t qt, bool& meet, bool& plain) {
      const int64_t kt = j0 / kTile + hf * step;
      if (hf >= kHalves || kt >= k_tiles) return;
      meet = tiles_meet(m, tb, qt, kt, hk);
      plain = tiles_unmasked(m, tb, qt, kt, n, hk);
    });
  }
  // u becomes the first unit at or after u (query tiles up within a head, then the heads up) that
  // the plan meets; false (u.g = group) when none.
  __device__ bool next(const TilePlan& plan, QueryUnit& u) const {
    while (u.g < group) {
      const int64_t t = plan.next(u.t);
      if (t < q_tiles) {
        u.t = static_cast<int>(t);
        return true;
      }
      ++u.g;
      u.t = 0;
    }
    return false;
  }
  // u becomes the last unit at or before u (query tiles down within a head, then the heads down)
  // that the plan meets; false (u.g < 0) when none.
  __device__ bool prev(const TilePlan& plan, QueryUnit& u) const {
    while (u.g >= 0) {
      u.t = static_cast<int>(plan.prev(u.t));
      if (u.t >= 0) return true;
      --u.g;
      u.t = static_cast<int>(q_tiles) - 1;
    }
    return false;
  }
  __device__ int64_t head(QueryUnit u) const { return hk * group + u.g; }
  // Element offset of a unit's chunk of dQ in tile order (dq_tile_index).
  __device__ int64_t dq_chunk(QueryUnit u, const AttentionDims& n) const {
    return ((b * q_tiles + u.t) * n.H + head(u)) * kTile * n.D;
  }
  // Element offset of a unit's first query row in q-like tensors (B, T, H, D).
  __device__ int64_t q_offset(QueryUnit u, const AttentionDims& n) const {
    return ((b * n.T + int64_t{u.t} * kTile) * n.H + head(u)) * n.D;
  }
  // dK (times scale) and dV of this warp's 16 keys (rows row0.. of the block) as bf16.
  template <int kD>
  __device__ void store_grads(bf16* dk, bf16* dv, int row0, const float (&acc_dk)[kD / 8][4],
                              const float (&acc_dv)[kD / 8][4], float scale, const AttentionDims& n) const {
    const int h = row0 / kTile, r0 = row0 % kTile;
    const int64_t at = half_offset(h);
    store_rows<kD>(dk + at, kv_stride, r0, half_nk(n, h), acc_dk, scale);
    store_rows<kD>(dv + at, kv_stride, r0, half_nk(n, h), acc_dv, 1.f);
  }
  // Starts the async copies of a unit's query positions, lse and delta (kT threads); the rows
  // (q, dO) are the caller's, whose tile layouts differ.
  template <int kT>
  __device__ void issue_vectors(RowPos<kTile>& qpos, float* lse_s, float* delta_s, const float* lse,
                                const float* delta, QueryUnit u, const AttentionDims& n,
                                const AttentionMask& m) const {
    const int64_t i0 = int64_t{u.t} * kTile, row = (b * n.H + head(u)) * n.T;
    if (m.q_pos != nullptr) load_vec_async<kTile, kT>(qpos.pos, m.q_pos, i0, n.T);
    load_vec_async<kTile, kT>(lse_s, lse + row, i0, n.T);
    load_vec_async<kTile, kT>(delta_s, delta + row, i0, n.T);
  }
};

// Key-row tiles of the dK dV kernels: a warp's 16 keys (rows row0 + g and + 8 of
// the block) by a 64-query tile (columns 8 nt + 2 t4 and + 1), as m16n8 accumulators.

// A query tile's per-row values (lse or delta) as the key-row tiles use them: v[nt][e] is query
// column 8 nt + 2 t4 + e, read from shared memory in pairs. (Reading them ahead of the wait for
// S^T or dP^T in the warpgroup kernel, with the lse turned into exp2 form in shared memory once per
// unit, made ptxas spill and was 2% slower at 32K: kernels/NOTES.md, session 14.)
struct QueryCols {
  float v[8][2];
  __device__ __forceinline__ explicit QueryCols(const float* s) {
    const int t4 = threadIdx.x % 4;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float2 p = *reinterpret_cast<const float2*>(s + 8 * nt + 2 * t4);
      v[nt][0] = p.x;
      v[nt][1] = p.y;
    }
  }
};

// P^T in place of S^T: p = 2^(s scale_log2 - lse2(query)), 0 where hidden (when masked: hidden
// scores are set to -inf first, which the exponentials take to 0; 23% faster fwd+bwd at 32K on the
// warpgroup kernel than testing each probability, where the tests cost on every unit). lse2 is
// the lse in exp2 form (lse_exp2: +inf for a row that sees nothing, so p = 0).
template <int kKeys>
__device__ __forceinline__ void key_rows_probabilities(float (&st)[8][4], const QueryCols& lse2, float scale_log2,
                                                       bool masked, const AttentionMask& m, const RowPos<kTile>& qp,
                                                       int nq, const RowPos<kKeys>& kp, int row0, int nk) {
  if (masked) mask_scores<true>(st, m, qp, row0, nq, kp, nk);
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        st[nt][2 * hr + e] = fast_exp2(fmaf(st[nt][2 * hr + e], scale_log2, -lse2.v[nt][e]));
}
// The same from the tile's lse as stored (natural log).
template <int kKeys>
__device__ __forceinline__ void key_rows_probabilities(float (&st)[8][4], const float* lse, float scale_log2,
                                                       bool masked, const AttentionMask& m, const RowPos<kTile>& qp,
                                                       int nq, const RowPos<kKeys>& kp, int row0, int nk) {
  QueryCols lse2(lse);
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) lse2.v[nt][e] = lse_exp2(lse2.v[nt][e]);
  key_rows_probabilities(st, lse2, scale_log2, masked, m, qp, nq, kp, row0, nk);
}

// dS^T in place of dP^T: ds = p (dp - delta(query)).
__device__ __forceinline__ void key_rows_score_grad(float (&dpt)[8][4], const float (&pt)[8][4],
                                                    const QueryCols& delta) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        dpt[nt][2 * hr + e] = pt[nt][2 * hr + e] * (dpt[nt][2 * hr + e] - delta.v[nt][e]);
}
__device__ __forceinline__ void key_rows_score_grad(float (&dpt)[8][4], const float (&pt)[8][4], const float* delta) {
  key_rows_score_grad(dpt, pt, QueryCols(delta));
}

// Adds scale times a 16 x 8 kN accumulator (rows row0 + g and + 8, columns 8 nt + 2 t4 and + 1)
// into fp32 rows with atomics: `rows` points at row 0, column 0 (row stride `stride`); rows at or
// past nq are skipped.
template <int kN>
__device__ __forceinline__ void add_rows(float* rows, int64_t stride, int row0, int nq, const float (&acc)[kN][4],
                                         float scale) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row0 + g + 8 * hr;
    if (r >= nq) continue;
    float* row = rows + r * stride + 2 * t4;
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) add_pair(row + 8 * nt, scale * acc[nt][2 * hr], scale * acc[nt][2 * hr + 1]);
  }
}

// ---------------------------------------------------------------- launch helpers

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  int device = 0, limit = 0;
  LOOM_CUDA_CHECK(cudaGetDevice(&device));
  LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  LOOM_CHECK(bytes <= static_cast<size_t>(limit))
      << "flash attention (CUDA): a block needs " << bytes << " bytes of shared memory (its tile plan grows with "
      << "the sequence), the device allows " << limit << "; split the sequence (parallel.cp) or use the interim kernels";
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename Fn>
void dispatch_flash_head_dim(int64_t D, Fn&& fn) {
  if (D == 64) fn(std::integral_constant<int, 64>{});
  else if (D == 128) fn(std::integral_constant<int, 128>{});
  else LOOM_FAIL() << "flash attention (CUDA): head dim D = " << D << " is not 64 or 128";
}

// The grid of `blocks` row blocks of `heads` heads (block_slot): heads varying fastest.
inline dim3 flash_grid(int64_t blocks, int64_t heads, int64_t batch) {
  LOOM_CHECK(blocks <= 65535 && heads < (int64_t{1} << 31) && batch <= 65535)
      << "flash attention (CUDA): " << blocks << " row blocks, " << heads << " heads, batch " << batch
      << " exceed the grid (at most 65535 row blocks of 64 or 128 rows and 65535 sequences per call)";
  return dim3(static_cast<unsigned>(heads), static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
}

// The forward and the fused dK dV pass on warpgroup products (flash_sm90.cu); callers check
// wgmma_available() (wgmma_check.h) and that q, k, v (and dout) are 16-byte aligned (the tensor
// maps' rule). Same arguments as the mma.sync kernels.
void launch_flash_forward_sm90(void* out, float* lse, const void* q, const void* k, const void* v, const AttentionGate& gate,
                               const AttentionDims& n, const AttentionMask& mask, const TileBounds& tb, float scale,
                               cudaStream_t stream);
void launch_flash_dkdv_sm90(void* dk, void* dv, float* dq_acc, const void* dout, const float* lse, const float* delta,
                            const void* q, const void* k, const void* v, const AttentionDims& n,
                            const AttentionMask& mask, const TileBounds& tb, float scale, cudaStream_t stream);

inline int64_t tiles_of(int64_t rows) { return (rows + kTile - 1) / kTile; }
inline unsigned blocks_of(int64_t rows) { return static_cast<unsigned>((rows + kBlockRows - 1) / kBlockRows); }

}  // namespace loom::cuda::detail::flash
