// Flash attention on tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation) for bf16 storage and head dims 64 and 128, with the interim
// kernels' contract (attention_launch.h): GQA, causal mask by global i64
// positions (any order: contiguous, zigzag, ring blocks), the S2 block mask,
// per-row log-sum-exp out and its gradient in.
//
//   forward  one block of 8 warps per (128-query block, head, batch); each
//            warp owns 16 query rows. Key/value tiles of 64 rows stream
//            through shared memory with cp.async, double buffered; S = Q K^T
//            and O += P V on tensor cores (fragments by ldmatrix.x4), online
//            softmax in fp32 (exp2 domain), P reused from the S accumulators
//            as the A operand (mma.cuh).
//   backward the interim kernels' delta pre-pass (rowsum(dO * O) - dlse),
//            then either the fused pass (dK, dV per 128-key block as below,
//            which also adds each query tile's dS K into an fp32 dQ with
//            atomics; dQ's rounding varies from run to run) or, deterministic,
//            two passes without atomics: dQ per 128-query
//            block over key tiles (S, dP = dO V^T, dQ += dS K), and dK, dV per
//            128-key block over the 64-query tiles of every head of its GQA
//            group (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q),
//            each warp owning 16 keys. P is recomputed from lse in both.
// Tile plan: a pre-pass writes each 64-row tile's min/max position; at its
// start a block turns them into bit masks over the tiles it walks (per half of
// its 128 rows: the pair can meet / needs no per-element mask), so tiles that
// causal or S2 hide entirely are never loaded, a warp skips a tile its half
// does not meet, and per-element masking runs only on tiles that need it
// (diagonal, tails, S2 block edges). Every load of the main loops (rows,
// positions, lse, delta) is asynchronous.
// Where the build has sm_90a code and the GPU is sm_90 (wgmma_available()),
// the forward and the fused dK dV pass run flash_sm90.cu's warpgroup kernels
// instead (same blocks, plan and rounding; LOOM_FLASH_WGMMA=0 keeps these);
// the pieces both files use are in flash_common.cuh.
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/wgmma_check.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

namespace loom::cuda::detail {

namespace {

using namespace flash;

// lo[t], hi[t] = min, max of pos[64 t, min(64 t + 64, count)); one warp per tile.
__global__ void __launch_bounds__(kBoundsThreads)
    flash_bounds_kernel(int64_t* __restrict__ lo, int64_t* __restrict__ hi, const int64_t* __restrict__ pos,
                        int64_t count) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * (kBoundsThreads / 32) + threadIdx.x / 32;
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

// ---------------------------------------------------------------- forward

template <int kD>
__global__ void __launch_bounds__(kThreads, 1)
    flash_forward_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                         const bf16* __restrict__ k, const bf16* __restrict__ v, AttentionDims n, AttentionMask m,
                         TileBounds tb, float scale, AttentionGate gate) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const QuerySmem<kD, 1> sm(smem_raw);
  const QueryBlock blk = query_block(n);
  const int warp = threadIdx.x / 32;
  const int half = warp / 4, row0 = 16 * warp;  // this warp's 64-row tile of the block and first row
  const int nq = blk.nq;

  const TilePlan plan = start_query_block(sm, q, blk, n, m, tb);

  const float scale_log2 = scale * kLog2e;
  // Row maxima of the raw scores (scaled on use); row_sum: this thread's part.
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float acc_o[kD / 8][4] = {};
  uint32_t qf[kD / 16][4];

  walk_key_tiles(sm, plan, k, v, blk, n, m, [&](int64_t kt, int stage, bool first) {
    if (first) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) ldsm_a(qf[kk], sm.rows, kLd<kD>, row0, 16 * kk);
    }
    if (!plan.meet(half, kt)) return;  // nothing of this warp's rows meets the tile
    float s[8][4] = {};
    mma_frags_by_rows<kD>(s, qf, sm.ks + stage * kTileElems<kD>);  // S = Q K^T
    if (!plan.plain(half, kt))
      mask_scores(s, m, *sm.qpos, row0, nq, sm.kpos[stage], rows_from(n.S, kt * kTile, kTile));
    online_softmax<kD>(s, row_max, row_sum, acc_o, scale_log2);
    uint32_t pf[4][4];
    c_to_a(pf, s);
    mma_frags_by_tile<kD>(acc_o, pf, sm.vs + stage * kTileElems<kD>);  // O += P V
  });

  finish_query_rows<kD>(acc_o, lse + (blk.b * n.H + blk.h) * n.T + blk.i0, row_max, row_sum, row0, nq, scale);
  store_out_rows<kD>(out, gate, blk.q_offset, blk.q_stride, row0, nq, acc_o);
}

// ---------------------------------------------------------------- backward


// ---- dQ: one block per (128-query block, head, batch); warp -> 16 query rows.

template <int kD>
__global__ void __launch_bounds__(kThreads, 1)
    flash_backward_dq_kernel(bf16* __restrict__ dq, const bf16* __restrict__ dout, const float* __restrict__ lse,
                             const float* __restrict__ delta, const bf16* __restrict__ q, const bf16* __restrict__ k,
                             const bf16* __restrict__ v, AttentionDims n, AttentionMask m, TileBounds tb,
                             float scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const QuerySmem<kD, 2> sm(smem_raw);
  const QueryBlock blk = query_block(n);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int half = warp / 4, row0 = 16 * warp;
  const int nq = blk.nq;
  const bf16* qs = sm.rows;
  const bf16* dos = sm.rows + kTileElems<kD, kBlockRows>;

  load_rows_async<kD, kBlockRows>(sm.rows, q + blk.q_offset, blk.q_stride, nq);
  load_rows_async<kD, kBlockRows>(sm.rows + kTileElems<kD, kBlockRows>, dout + blk.q_offset, blk.q_stride, nq);
  if (m.q_pos != nullptr) load_vec_async<kBlockRows>(sm.qpos->pos, m.q_pos, blk.i0, n.T);
  cp_async_commit();

  // This lane's two rows: lse in the exp2 domain and delta.
  float lse2[2], dl[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row0 + g + 8 * hr;
    const int64_t row = (blk.b * n.H + blk.h) * n.T + blk.i0 + r;
    lse2[hr] = r < nq ? lse_exp2(lse[row]) : INFINITY;
    dl[hr] = r < nq ? delta[row] : 0.f;
  }
  const TilePlan plan = query_block_plan(sm.plan, blk, n, m, tb);

  const float scale_log2 = scale * kLog2e;
  float acc_dq[kD / 8][4] = {};
  walk_key_tiles(sm, plan, k, v, blk, n, m, [&](int64_t kt, int stage, bool) {
    if (!plan.meet(half, kt)) return;
    const bf16* kt_s = sm.ks + stage * kTileElems<kD>;
    float s[8][4] = {}, dp[8][4] = {};
    mma_rows_by_rows<kD>(s, qs, row0, kt_s);                                // S = Q K^T
    mma_rows_by_rows<kD>(dp, dos, row0, sm.vs + stage * kTileElems<kD>);    // dP = dO V^T
    const bool masked = !plan.plain(half, kt);
    const int nk = rows_from(n.S, kt * kTile, kTile);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hr = e / 2, r = row0 + g + 8 * hr, c = 8 * nt + 2 * t4 + (e % 2);
        float p = fast_exp2(fmaf(s[nt][e], scale_log2, -lse2[hr]));
        if (masked && hidden(m, *sm.qpos, r, nq, sm.kpos[stage], c, nk)) p = 0.f;
        dp[nt][e] = p * (dp[nt][e] - dl[hr]);  // dS
      }
    uint32_t dsf[4][4];
    c_to_a(dsf, dp);
    mma_frags_by_tile<kD>(acc_dq, dsf, kt_s);  // dQ += dS K
  });
  store_rows<kD>(dq + blk.q_offset, blk.q_stride, row0, nq, acc_dq, scale);
}


// dq (bf16) <- dq_acc (fp32), n elements.
__global__ void flash_dq_store_kernel(bf16* __restrict__ dq, const float* __restrict__ dq_acc, int64_t n) {
  for (int64_t i = 2 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x); i < n;
       i += 2 * static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float2 f = *reinterpret_cast<const float2*>(dq_acc + i);  // n is even: D is 64 or 128
    *reinterpret_cast<__nv_bfloat162*>(dq + i) = __floats2bfloat162_rn(f.x, f.y);
  }
}

// dq (bf16, (B, T, H, D)) <- dq_acc in tile order (dq_tile_index): one block per chunk (b, query
// tile, head), each thread 4 floats (two rows by two columns) at a time; rows past T skipped.
constexpr int kDqStoreThreads = 256;
__global__ void __launch_bounds__(kDqStoreThreads)
    flash_dq_store_tiles_kernel(bf16* __restrict__ dq, const float* __restrict__ dq_acc, AttentionDims n) {
  const int64_t chunk = blockIdx.x, q_tiles = (n.T + kTile - 1) / kTile;
  const int64_t h = chunk % n.H, t = (chunk / n.H) % q_tiles, b = chunk / n.H / q_tiles;
  const float4* from = reinterpret_cast<const float4*>(dq_acc + chunk * kTile * n.D);
  const int quads = kTile * static_cast<int>(n.D) / 4;
  for (int i = threadIdx.x; i < quads; i += kDqStoreThreads) {
    const float4 f = from[i];  // (row, col), (row, col + 1), (row + 8, col), (row + 8, col + 1)
    const TileCell c = dq_tile_cell(4 * (i % (kDqTileElems / 4)));
    const int64_t i0 = t * kTile + c.row;
    bf16* out = dq + ((b * n.T + i0) * n.H + h) * n.D + 64 * (i / (kDqTileElems / 4)) + c.col;
    if (i0 < n.T) *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(f.x, f.y);
    if (i0 + 8 < n.T) *reinterpret_cast<__nv_bfloat162*>(out + 8 * n.H * n.D) = __floats2bfloat162_rn(f.z, f.w);
  }
}

// ---- dK, dV: one block per (128-key block, kv head, batch); warp -> 16 keys;
// loops over the 64-query tiles of every query head of the GQA group.

// Row stride of the dS^T tile (keys x 64 queries, bf16) the fused backward shares for dQ.
constexpr int kLdS = kTile + 8;

template <int kD, int kKeys>
struct KeySmem {
  static constexpr size_t kBase = sizeof(bf16) * (2 * kTileElems<kD, kKeys> + 4 * kTileElems<kD>) +
                                  sizeof(RowPos<kKeys>) + 2 * sizeof(RowPos<kTile>) +
                                  2 * 2 * kTile * sizeof(float);
  static constexpr size_t kDsBytes = sizeof(bf16) * kKeys * kLdS;
  // With its own dS^T tile (the fused backward with 8 warps) the plan is followed by it.
  static size_t bytes(int64_t query_tiles, bool ds_tile) {
    return kBase + plan_bytes(query_tiles) + (ds_tile ? kDsBytes : 0);
  }

  bf16* ks;   // kKeys rows
  bf16* vs;   // kKeys rows
  bf16* qs;   // 2 stages x 64 rows
  bf16* dos;  // 2 stages x 64 rows
  RowPos<kKeys>* kpos;
  RowPos<kTile>* qpos;  // 2 stages
  float* lse;           // 2 stages x 64 (natural log; -inf: the row sees nothing)
  float* delta;         // 2 stages x 64
  uint32_t* plan;
  bf16* ds;  // (kKeys, kLdS): dS^T of the current query tile (fused backward), after the plan

  __device__ KeySmem(unsigned char* raw, int64_t query_tiles) {
    ks = reinterpret_cast<bf16*>(raw);
    vs = ks + kTileElems<kD, kKeys>;
    qs = vs + kTileElems<kD, kKeys>;
    dos = qs + 2 * kTileElems<kD>;
    kpos = reinterpret_cast<RowPos<kKeys>*>(dos + 2 * kTileElems<kD>);
    qpos = reinterpret_cast<RowPos<kTile>*>(kpos + 1);
    lse = reinterpret_cast<float*>(qpos + 2);
    delta = lse + 2 * kTile;
    plan = reinterpret_cast<uint32_t*>(delta + 2 * kTile);
    ds = reinterpret_cast<bf16*>(reinterpret_cast<unsigned char*>(plan) + plan_bytes(query_tiles));
  }
};

// kFusedDq: also dQ, each query tile's dS K over this block's 128 keys added
// (scaled) into dq_acc (B, T, H, D) fp32 with atomics (the fused backward: 5
// products per tile pair instead of the 7 of the dQ and dK dV kernels; the
// order of the additions, so dQ's rounding, varies from run to run).
//
// kW warps per block (16 keys each): 8 (128 keys, one block per SM) or 4 (64
// keys, two blocks per SM: one block's barriers and loads overlap the other's
// products; twice the dQ atomics). With 4 warps the dS^T tile takes the
// current stage's dO rows (dead once dP^T and dV are formed; one more barrier)
// so that two blocks fit in shared memory. The launch takes 4 warps when S2 blocks are
// narrower than 128 keys (a strided S2 column would leave half of an 8-warp block idle on
// most query tiles; measured at 32K: 4 warps 18.5 ms against 8 warps 23.0, while dense
// causal is faster with 8: 84.5 against 97.6; kernels/NOTES.md).
template <int kD, bool kFusedDq, int kW>
__global__ void __launch_bounds__(32 * kW, 8 / kW)
    flash_backward_dkdv_kernel(bf16* __restrict__ dk, bf16* __restrict__ dv, float* __restrict__ dq_acc,
                               const bf16* __restrict__ dout, const float* __restrict__ lse,
                               const float* __restrict__ delta, const bf16* __restrict__ q,
                               const bf16* __restrict__ k, const bf16* __restrict__ v, AttentionDims n,
                               AttentionMask m, TileBounds tb, float scale) {
  constexpr int kT = 32 * kW, kKeys = 16 * kW, kHalves = kW / 4;  // halves: 64-key tiles of the block
  constexpr bool kDsInDo = kW == 4;
  static_assert(kW == 4 || kW == 8);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const KeyBlock kb(n, kKeys);
  const KeySmem<kD, kKeys> sm(smem_raw, kb.q_tiles);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int half = warp / 4, row0 = 16 * warp;  // this warp's 64-key tile of the block and first key
  const int nk = kb.nk;

  load_rows_async<kD, kKeys, kT>(sm.ks, k + kb.kv_offset, kb.kv_stride, nk);
  load_rows_async<kD, kKeys, kT>(sm.vs, v + kb.kv_offset, kb.kv_stride, nk);
  if (m.q_pos != nullptr) load_vec_async<kKeys, kT>(sm.kpos->pos, m.k_pos, kb.j0, n.S);
  cp_async_commit();
  const TilePlan plan = kb.plan<kT, kHalves>(sm.plan, n, m, tb);
  auto issue = [&](QueryUnit u, int stage) {
    const int nq = rows_from(n.T, int64_t{u.t} * kTile, kTile);
    const int64_t at = kb.q_offset(u, n);
    load_rows_async<kD, kTile, kT>(sm.qs + stage * kTileElems<kD>, q + at, kb.q_stride, nq);
    load_rows_async<kD, kTile, kT>(sm.dos + stage * kTileElems<kD>, dout + at, kb.q_stride, nq);
    kb.issue_vectors<kT>(sm.qpos[stage], sm.lse + stage * kTile, sm.delta + stage * kTile, lse, delta, u, n, m);
  };

  const float scale_log2 = scale * kLog2e;
  float acc_dk[kD / 8][4] = {}, acc_dv[kD / 8][4] = {};
  // Units stepped as (head, query tile) pairs, up: no 64-bit division per unit.
  QueryUnit unit{0, 0};
  bool have = kb.next(plan, unit);
  if (have) issue(unit, 0);
  cp_async_commit();
  int stage = 0;
  bool first = true;
  while (have) {
    QueryUnit next{unit.g, unit.t + 1};
    const bool have_next = kb.next(plan, next);
    if (have_next) issue(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int64_t qt = unit.t;
    if (m.s2_block > 0) {
      const bool tile_masked = !(plan.plain(0, qt) && (kHalves < 2 || plan.plain(1, qt)));
      if (first || tile_masked) {
        if (first) fill_s2<kKeys, kT>(*sm.kpos, m, kb.hk);
        if (tile_masked) fill_s2<kTile, kT>(sm.qpos[stage], m, kb.hk);
        __syncthreads();
      }
    }
    // With kDsInDo the dS^T tile is this stage's dO rows, written after every warp is done with them.
    bf16* const ds_tile = kDsInDo ? sm.dos + stage * kTileElems<kD> : sm.ds;
    constexpr int kLdDs = kDsInDo ? kLd<kD> : kLdS;
    uint32_t dsf[4][4];
    if (plan.meet(half, qt)) {
      const int nq = rows_from(n.T, qt * kTile, kTile);
      const bf16* qt_s = sm.qs + stage * kTileElems<kD>;
      const bf16* dot_s = sm.dos + stage * kTileElems<kD>;
      const float* ls = sm.lse + stage * kTile;
      const float* ds = sm.delta + stage * kTile;
      // Rows: this warp's 16 keys; columns: the 64 queries. P^T is finished and
      // used (dV) before dP^T is formed, so its bf16 fragments are dead by then
      // (at D 128 both accumulators and all four fragment sets do not fit in registers).
      float st[8][4] = {};
      mma_rows_by_rows<kD>(st, sm.ks, row0, qt_s);  // S^T = K Q^T
      key_rows_probabilities(st, ls, scale_log2, !plan.plain(half, qt), m, sm.qpos[stage], nq, *sm.kpos, row0, nk);
      {
        uint32_t pf[4][4];
        c_to_a(pf, st);
        mma_frags_by_tile<kD>(acc_dv, pf, dot_s);  // dV += P^T dO
      }
      float dpt[8][4] = {};
      mma_rows_by_rows<kD>(dpt, sm.vs, row0, dot_s);  // dP^T = V dO^T
      key_rows_score_grad(dpt, st, ds);  // dS^T
      c_to_a(dsf, dpt);
      mma_frags_by_tile<kD>(acc_dk, dsf, qt_s);  // dK += dS^T Q
    }
    if constexpr (kFusedDq) {
      if constexpr (kDsInDo) __syncthreads();  // every warp is done with this stage's dO
      if (plan.meet(half, qt)) {
        // This warp's 16 rows of dS^T (keys x queries, the bf16 values dK used) into the shared tile:
        // dsf[kk][j] holds key row g + 8 (j & 1), query columns 16 kk + 8 (j >> 1) + 2 t4, + 1.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            *reinterpret_cast<uint32_t*>(ds_tile + (row0 + g + 8 * (j & 1)) * kLdDs + 16 * kk + 8 * (j >> 1) +
                                         2 * t4) = dsf[kk][j];
      }
      __syncthreads();  // the dS^T rows of every warp that met the tile are in place
      // dQ (64 queries x D) += dS K over the block's keys of the halves that met the tile: warp ->
      // query rows [16 (warp % 4), + 16), column halves (warp / 4) (8 warps) or both (4 warps).
      const int mt = warp % 4;
      const bool any = plan.meet(0, qt) || (kHalves > 1 && plan.meet(1, qt));
#pragma unroll 1
      for (int ch = warp / 4; ch < 2 && any; ch += kW / 4) {
        const int c0 = ch * (kD / 2);
        float acc[kD / 16][4] = {};
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk) {
          if (!plan.meet(kk / 4, qt)) continue;  // that half's rows were not written (uniform over the block)
          uint32_t a[4];
          ldsm_a_kmajor(a, ds_tile, kLdDs, 16 * mt, 16 * kk);  // A[m = query][k = key] = dS^T[key][query]
#pragma unroll
          for (int np = 0; np < kD / 32; ++np) {
            uint32_t bb[4];
            ldsm_b2_kmajor(bb, sm.ks, kLd<kD>, c0 + 16 * np, 16 * kk);  // B[k = key][n = d] = K[key][d]
            mma_bf16(acc[2 * np], a, bb[0], bb[1]);
            mma_bf16(acc[2 * np + 1], a, bb[2], bb[3]);
          }
        }
        add_rows(dq_acc + kb.q_offset(unit, n) + c0, kb.q_stride, 16 * mt, rows_from(n.T, qt * kTile, kTile), acc,
                 scale);
      }
    }
    // Before the next unit's loads refill this stage. The 8-warp fused kernel needs no barrier
    // here: every warp finished reading this stage's rows before the dS^T barrier, and the next
    // dS^T is written only after the next unit's first barrier (all warps done with this dQ).
    if constexpr (!kFusedDq || kDsInDo) __syncthreads();
    first = false;
    unit = next;
    have = have_next;
    stage ^= 1;
  }
  cp_async_wait<0>();
  kb.store_grads<kD>(dk, dv, row0, acc_dk, acc_dv, scale, n);
}

// ---------------------------------------------------------------- launches



// The forward and the fused dK dV pass on warpgroup products where the build and device
// have them and the row tensors are 16-byte aligned (their tensor maps need it; views of
// whole rows always are); LOOM_FLASH_WGMMA=0 takes the mma.sync kernels (read at each launch:
// the tests run both families in one process).
bool use_sm90(std::initializer_list<const void*> rows) {
  const char* e = std::getenv("LOOM_FLASH_WGMMA");
  if (e != nullptr && std::string(e) == "0") return false;
  for (const void* p : rows)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return wgmma_available();
}

// The tile bounds of q and k positions into `scratch` (2 * (T tiles + S tiles) i64).
TileBounds compute_bounds(int64_t* scratch, const AttentionDims& n, const AttentionMask& m, cudaStream_t stream) {
  TileBounds tb;
  if (m.q_pos == nullptr) return tb;
  const int64_t qt = tiles_of(n.T), kt = tiles_of(n.S);
  int64_t* q_lo = scratch;
  int64_t* q_hi = q_lo + qt;
  int64_t* k_lo = q_hi + qt;
  int64_t* k_hi = k_lo + kt;
  constexpr int64_t kPerBlock = kBoundsThreads / 32;
  if (qt > 0) {
    flash_bounds_kernel<<<static_cast<unsigned>((qt + kPerBlock - 1) / kPerBlock), kBoundsThreads, 0, stream>>>(
        q_lo, q_hi, m.q_pos, n.T);
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  if (kt > 0) {
    flash_bounds_kernel<<<static_cast<unsigned>((kt + kPerBlock - 1) / kPerBlock), kBoundsThreads, 0, stream>>>(
        k_lo, k_hi, m.k_pos, n.S);
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

int64_t flash_dq_acc_elems(const AttentionDims& n) { return n.B * tiles_of(n.T) * kTile * n.H * n.D; }

void launch_flash_attention_forward(void* out, float* lse, const void* q, const void* k, const void* v,
                                    int64_t* scratch, const AttentionDims& n, const AttentionMask& mask,
                                    float scale, cudaStream_t stream, const AttentionGate& gate) {
  if (n.B == 0 || n.H == 0 || n.T == 0) return;
  const TileBounds tb = compute_bounds(scratch, n, mask, stream);
  if (use_sm90({q, k, v})) {
    launch_flash_forward_sm90(out, lse, q, k, v, gate, n, mask, tb, scale, stream);
    return;
  }
  dispatch_flash_head_dim(n.D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    auto kernel = flash_forward_kernel<kD>;
    const size_t smem = QuerySmem<kD, 1>::bytes(tiles_of(n.S));
    set_smem(kernel, smem);
    const dim3 grid = flash_grid(blocks_of(n.T), n.H, n.B);
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<bf16*>(out), lse, static_cast<const bf16*>(q),
                                             static_cast<const bf16*>(k), static_cast<const bf16*>(v), n, mask, tb,
                                             scale, gate);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void launch_flash_attention_backward(void* dq, void* dk, void* dv, float* delta, int64_t* scratch, float* dq_acc,
                                     const void* dout, const float* dlse, const void* q, const void* k,
                                     const void* v, const void* out, const float* lse, const AttentionDims& n,
                                     const AttentionMask& mask, float scale, cudaStream_t stream) {
  if (n.B == 0 || n.H == 0) return;
  if (out != nullptr) launch_attention_delta(DType::bf16, delta, dout, out, dlse, n, stream);  // else: given
  const TileBounds tb = compute_bounds(scratch, n, mask, stream);
  const bool fused = dq_acc != nullptr;
  const int64_t dq_elems = n.B * n.T * n.H * n.D;
  if (fused && dq_elems > 0)
    LOOM_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, static_cast<size_t>(flash_dq_acc_elems(n)) * sizeof(float), stream));
  bool tiled = false;  // dq_acc in tile order (the warpgroup kernel's), else (B, T, H, D)
  dispatch_flash_head_dim(n.D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    if (n.T > 0 && !fused) {
      auto kernel = flash_backward_dq_kernel<kD>;
      const size_t smem = QuerySmem<kD, 2>::bytes(tiles_of(n.S));
      set_smem(kernel, smem);
      const dim3 grid = flash_grid(blocks_of(n.T), n.H, n.B);
      kernel<<<grid, kThreads, smem, stream>>>(static_cast<bf16*>(dq), static_cast<const bf16*>(dout), lse, delta,
                                               static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                                               static_cast<const bf16*>(v), n, mask, tb, scale);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
    // S2 blocks narrower than 128 keys: the 4-warp kernel, or the warpgroup kernel with its key
    // tiles paired within chunks of 2 vert_stride tiles where the S2 blocks are whole tiles (7%
    // faster at 32K than the 4-warp kernel; key_tiles_of).
    const bool sm90 = use_sm90({q, k, v, dout}), paired = sm90 && mask.s2_block == kTile;
    const bool four = fused && mask.s2_block > 0 && mask.s2_block % kBlockRows != 0 && !paired;
    if (n.S > 0 && fused && !four && sm90) {
      launch_flash_dkdv_sm90(dk, dv, dq_acc, dout, lse, delta, q, k, v, n, mask, tb, scale, stream);
      tiled = true;
    } else if (n.S > 0) {
      auto kernel = !fused ? flash_backward_dkdv_kernel<kD, false, 8>
                    : four ? flash_backward_dkdv_kernel<kD, true, 4>
                           : flash_backward_dkdv_kernel<kD, true, 8>;
      const size_t smem = four ? KeySmem<kD, 64>::bytes(tiles_of(n.T), false)
                               : KeySmem<kD, kBlockRows>::bytes(tiles_of(n.T), fused);
      set_smem(kernel, smem);
      const int64_t keys = four ? 64 : kBlockRows;
      const dim3 grid = flash_grid((n.S + keys - 1) / keys, n.Hkv, n.B);
      kernel<<<grid, four ? 128 : kThreads, smem, stream>>>(static_cast<bf16*>(dk), static_cast<bf16*>(dv), dq_acc,
                                               static_cast<const bf16*>(dout), lse, delta,
                                               static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                                               static_cast<const bf16*>(v), n, mask, tb, scale);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
  });
  if (fused && dq_elems > 0 && tiled) {
    const int64_t chunks = n.B * tiles_of(n.T) * n.H;
    LOOM_CHECK(chunks <= std::numeric_limits<int>::max()) << "flash attention (CUDA): " << chunks << " dQ tiles";
    flash_dq_store_tiles_kernel<<<static_cast<unsigned>(chunks), kDqStoreThreads, 0, stream>>>(static_cast<bf16*>(dq),
                                                                                             dq_acc, n);
    LOOM_CUDA_CHECK(cudaGetLastError());
  } else if (fused && dq_elems > 0) {
    const int64_t pairs = dq_elems / 2;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + 255) / 256, 4096));
    flash_dq_store_kernel<<<blocks, 256, 0, stream>>>(static_cast<bf16*>(dq), dq_acc, dq_elems);
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace loom::cuda::detail
