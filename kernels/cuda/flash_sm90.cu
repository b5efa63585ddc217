// Flash attention on warpgroup products (wgmma, sm_90a): the forward and the
// fused dK dV pass, launched instead of flash_attention.cu's mma.sync kernels
// where wgmma_available(). Products read their operands from shared memory
// through descriptors (wgmma.cuh's panel tiles) instead of fragment loads, and
// run asynchronously.
//
// Forward: the mma.sync kernel's blocks (128 queries), warp-specialized into
// three warpgroups. A producer warp copies K/V tiles into 4 stages through
// tensor maps (TMA) and publishes each through mbarriers; two consumer groups of 64 query rows each
// compute S = Q K^T (A = Q from registers, loaded once; B = K K-major), the
// online softmax in registers, and O += P V (A = P from registers, B = V
// N-major). A tile's O += P V is issued behind the next tile's S and runs while
// that tile's exponentials are computed. No block barrier inside the walk
// (measured against the alternatives in kernels/NOTES.md).
//
// Backward dK dV: the same work as flash_attention.cu's 8-warp fused kernel
// (one block per (128-key block, kv head, batch), walking the 64-query tiles
// of every head of the GQA group, here from the last down; dQ added into fp32
// in tile order with bulk reductions, key_group_dq_reduce), with two
// warpgroups of 64 keys each (under S2 with 64-key
// blocks, two tiles of one 2 vert_stride chunk: its two strided tiles
// vert_stride apart, or two of its local tiles in order: key_tiles_of,
// launched in s2_block_slot's order):
//   S^T  = K Q^T      (64 keys x 64 queries, A = K, B = Q: both K-major)
//   dV  += P^T dO     (A = P^T from registers, B = dO N-major)
//   dP^T = V dO^T     (A = V, B = dO: both K-major)
//   dK  += dS^T Q     (A = dS^T from registers, B = Q N-major)
//   dQ  += dS K       (dS^T of both groups through shared memory, M-major A;
//                      B = K N-major; D 128: each group 64 columns over the
//                      128 keys; D 64: each group all columns over its keys)
// One block barrier per unit, the dS^T exchange (two dS^T tiles, one per
// stage): a unit's dQ products are issued at the top of the next unit, before
// its S^T, and their reduction is handed off while S^T runs. Both groups run
// every unit of the block (P = 0 for a group that does not meet it), so no product sits
// under a branch. Thread 0 copies the next unit's Q and dO through tensor maps
// (TMA) into the other stage, completing on that stage's mbarrier.
// P and dS are rounded to bf16 as in the mma.sync kernels, so results agree
// with them to fp32 summation order.
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/tma.cuh"
#include "kernels/cuda/tma.h"
#include "kernels/cuda/wgmma.cuh"
#include "kernels/cuda/wgmma_check.h"

namespace loom::cuda::detail {

namespace {

using namespace flash;

constexpr int kKeys = 128;  // keys per block: 2 warpgroups x 64

// Shared memory: the block's K and V (128 rows), 2 stages of Q and dO (64 rows) and of dS^T
// (128 keys x 64 queries), all panel tiles from a 1024-byte aligned base; each key group's fp32 dQ
// tile (64 x 64, in dq_tile order); then positions, lse, delta and the plan.
template <int kD>
struct Sm90Smem {
  static constexpr int kKeyElems = kKeys * kD, kQueryElems = kTile * kD, kDsElems = kKeys * kTile;
  static constexpr size_t kTiles =
      sizeof(bf16) * (2 * kKeyElems + 4 * kQueryElems + 2 * kDsElems) + sizeof(float) * 2 * kDqTileElems;
  static constexpr size_t kBase =
      kTiles + sizeof(RowPos<kKeys>) + 2 * sizeof(RowPos<kTile>) + 2 * 2 * kTile * sizeof(float);
  static_assert(kTiles % 1024 == 0);
  static size_t bytes(int64_t query_tiles) { return 1024 + kBase + plan_bytes(query_tiles); }  // + alignment

  bf16* ks;
  bf16* vs;
  bf16* qs;   // 2 stages
  bf16* dos;  // 2 stages
  bf16* ds;   // 2 stages
  float* dqs;  // 2 key groups
  RowPos<kKeys>* kpos;
  RowPos<kTile>* qpos;  // 2 stages
  float* lse;           // 2 stages x 64
  float* delta;         // 2 stages x 64
  uint32_t* plan;

  __device__ explicit Sm90Smem(unsigned char* raw) {
    raw += (1024 - (smem_addr(raw) & 1023)) & 1023;
    ks = reinterpret_cast<bf16*>(raw);
    vs = ks + kKeyElems;
    qs = vs + kKeyElems;
    dos = qs + 2 * kQueryElems;
    ds = dos + 2 * kQueryElems;
    dqs = reinterpret_cast<float*>(ds + 2 * kDsElems);
    kpos = reinterpret_cast<RowPos<kKeys>*>(dqs + 2 * kDqTileElems);
    qpos = reinterpret_cast<RowPos<kTile>*>(kpos + 1);
    lse = reinterpret_cast<float*>(qpos + 2);
    delta = lse + 2 * kTile;
    plan = reinterpret_cast<uint32_t*>(delta + 2 * kTile);
  }
};

#if defined(LOOM_WGMMA)
// ---------------------------------------------------------------- register reallocation

using tma::mbar_arrive;
using tma::mbar_init;
using tma::mbar_wait;

// This warpgroup's registers per thread from here on (setmaxnreg; every warp of the group runs it).
template <int kRegs>
__device__ __forceinline__ void grow_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void shrink_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// One committed batch acc (64 x kD) += A B over 64 k: A = the bf16 fragments f, B = the N-major
// 64-row panel tile at units b (wgmma::units). f must stay unchanged (pin it) until a wait
// completes the batch.
template <int kD>
__device__ __forceinline__ void rs_products(float (&acc)[kD / 8][4], uint32_t (&f)[4][4], uint32_t b) {
  wgmma::pin(f);
  wgmma::pin(acc);
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if constexpr (kD == 128) wgmma::wgmma_rs_n128<1>(acc, f[kk], wgmma::mnmajor_at(b, kTile, 16 * kk));
    else wgmma::wgmma_rs_n64<1>(acc, f[kk], wgmma::mnmajor_at(b, kTile, 16 * kk));
  }
  wgmma::commit();
}
// rs_products, waited for (every batch of this thread done; acc and f free).
template <int kD>
__device__ __forceinline__ void rs_products_now(float (&acc)[kD / 8][4], uint32_t (&f)[4][4], uint32_t b) {
  rs_products<kD>(acc, f, b);
  wgmma::wait<0>();
  wgmma::pin(acc);
  wgmma::pin(f);
}
// The same with A = c (64 x 64 fp32 accumulators) packed into f first.
template <int kD>
__device__ __forceinline__ void rs_batch(float (&acc)[kD / 8][4], uint32_t (&f)[4][4], const float (&c)[8][4],
                                         uint32_t b) {
  c_to_a(f, c);
  rs_products<kD>(acc, f, b);
}

// ---------------------------------------------------------------- dK dV group steps

// This warp's 16 rows of dS^T (rows row0.. of the block; bf16 pairs as A fragments: f[kk][j] holds
// key row g + 8 (j & 1), query columns 16 kk + 8 (j >> 1) + 2 t4, + 1) into the shared tile ds.
__device__ __forceinline__ void store_ds(bf16* ds, const uint32_t (&f)[4][4], int row0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      *reinterpret_cast<uint32_t*>(
          ds + wgmma::panel_index(row0 + g + 8 * (j & 1), 16 * kk + 8 * (j >> 1) + 2 * t4, kKeys)) = f[kk][j];
}

// Starts the async copies (kT threads) of a dK dV block's keys and values, its two 64-key halves
// (apart when paired), into 128-row panel tiles, and of their positions.
template <int kD, int kT>
__device__ __forceinline__ void issue_block_keys(bf16* ks, bf16* vs, RowPos<kKeys>& kpos, const KeyBlock& kb,
                                                 const bf16* k, const bf16* v, const AttentionDims& n,
                                                 const AttentionMask& m) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rows = kb.half_nk(n, h);
    const int64_t at = rows > 0 ? kb.half_offset(h) : kb.kv_offset;
    load_panels_async<kD, kTile, kT, kKeys>(ks + kTile * 64 * h, k + at, kb.kv_stride, rows);
    load_panels_async<kD, kTile, kT, kKeys>(vs + kTile * 64 * h, v + at, kb.kv_stride, rows);
    if (m.q_pos != nullptr) load_vec_async<kTile, kT>(kpos.pos + kTile * h, m.k_pos, kb.half_j0(h), n.S);
  }
}

// A unit's rows in shared memory as a key group reads them: Q and dO (64-row panel tiles, as
// wgmma::units), lse, delta and positions of the query tile.
struct UnitRows {
  uint32_t q;
  uint32_t dout;
  const float* lse;
  const float* delta;
  const RowPos<kTile>* qpos;
  int nq;  // valid query rows
};

// Key group wg's products on one unit (its 64 keys, rows row0.. of the warp): S^T = K Q^T and
// dP^T = V dO^T, P, dV += P^T dO, dS, dK += dS^T Q, and its dS^T rows into ds. between() runs once
// S^T is issued, before dP^T (the previous unit's dQ reduction: its products, issued before S^T,
// are the batch it waits for). A group that does not `meet` the unit computes P = 0 (zeros into
// dV, dK and its dS^T rows). Returns once every product is done (the unit's rows are free).
template <int kD, typename Between>
__device__ __forceinline__ void key_group_unit(float (&acc_dk)[kD / 8][4], float (&acc_dv)[kD / 8][4],
                                               uint32_t ks, uint32_t vs, const UnitRows& u, bf16* ds,
                                               float scale_log2, bool meet, bool masked, const AttentionMask& m,
                                               const RowPos<kKeys>& kpos, int wg, int row0, int nk,
                                               Between&& between) {
  float st[8][4], dpt[8][4];  // fresh: the first product of each runs with accumulate 0
  wgmma::pin(st);
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)  // S^T = K Q^T
    wgmma::wgmma_ss_n64<0, 0>(st, wgmma::kmajor_at(ks, kKeys, 64 * wg, 16 * kk),
                              wgmma::kmajor_at(u.q, kTile, 0, 16 * kk), kk > 0);
  wgmma::commit();
  between();
  wgmma::pin(dpt);
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)  // dP^T = V dO^T
    wgmma::wgmma_ss_n64<0, 0>(dpt, wgmma::kmajor_at(vs, kKeys, 64 * wg, 16 * kk),
                              wgmma::kmajor_at(u.dout, kTile, 0, 16 * kk), kk > 0);
  wgmma::commit();
  wgmma::wait<1>();  // S^T is done; dP^T may still run
  wgmma::pin(st);
  key_rows_probabilities(st, u.lse, scale_log2, masked && meet, m, *u.qpos, u.nq, kpos, row0, nk);
  if (!meet) {  // no pair of the unit is visible to this group's keys
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) st[i][j] = 0.f;
  }
  uint32_t pf[4][4];
  rs_batch<kD>(acc_dv, pf, st, u.dout);  // dV += P^T dO
  wgmma::wait<1>();  // dP^T is done; dV may still run
  wgmma::pin(pf);    // live until here: dV's products may still read them
  wgmma::pin(dpt);
  key_rows_score_grad(dpt, st, u.delta);  // dS^T
  uint32_t dsf[4][4];
  rs_batch<kD>(acc_dk, dsf, dpt, u.q);  // dK += dS^T Q
  store_ds(ds, dsf, row0);
  wgmma::wait<0>();  // dV and dK have read the unit's rows
  wgmma::pin(pf);
  wgmma::pin(dsf);
  wgmma::pin(acc_dv);
  wgmma::pin(acc_dk);
}

// dQ (64 queries x D) = dS K over the keys of both groups' dS^T tile ds (D 128: this group's 64
// columns; D 64: all columns over this group's keys) into acc (fresh): one committed batch, not
// waited for. ds must be complete and visible (after a barrier). Tiles as wgmma::units.
template <int kD>
__device__ __forceinline__ void key_group_dq_issue(float (&acc)[8][4], uint32_t ds, uint32_t ks, int wg) {
  wgmma::pin(acc);
  wgmma::fence();
  constexpr int kSteps = kD == 128 ? kKeys / 16 : 4;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int kk = kD == 128 ? s : 4 * wg + s;  // D 64: this group's keys only
    wgmma::wgmma_ss_n64<1, 1>(acc, wgmma::mnmajor_at(ds, kKeys, 16 * kk),
                              wgmma::mnmajor_at(ks, kKeys, 16 * kk, kD == 128 ? wg : 0), s > 0);
  }
  wgmma::commit();
}
// A completed batch into dQ: scale times acc into the group's staging tile dqs (dq_tile order,
// conflict-free 16-byte stores), then the group's first thread adds the tile into its place in the
// unit's chunk of dq_acc with one bulk reduction (D 128: the group's 64 columns; D 64: all of
// them, both groups into the same place). Replaces 16 vector atomics per thread, whose source
// registers stayed held until the loads/stores unit took them: the next products' writes to those
// registers waited (13% of the loop's stall samples at 16K). The caller waits for the reduction to
// have read dqs (bulk_read_wait) before the block barrier that precedes the next write. `adds`
// false (the unit met none of the group's keys): nothing is added, but the group still passes its
// barrier, so both groups pass as many barriers. When only adding groups passed it, racecheck
// reported hazards on D 64 (where one group can add without the other) between the lse copies and
// reads, which the block barrier orders; with every group passing it, 0 hazards.
template <int kD>
__device__ __forceinline__ void key_group_dq_reduce(float* chunk, float* dqs, const float (&acc)[8][4], bool adds,
                                                    int wg, int warp_in_group, float scale) {
  const int lane = threadIdx.x % 32;
  if (adds) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      *reinterpret_cast<float4*>(dqs + dq_tile_index(warp_in_group, nt, lane)) =
          make_float4(scale * acc[nt][0], scale * acc[nt][1], scale * acc[nt][2], scale * acc[nt][3]);
    wgmma::fence_smem();  // the stores, before the bulk reduction reads them (async proxy)
  }
  tma::named_barrier(1 + wg, 128);
  if (adds && threadIdx.x % 128 == 0) {
    tma::bulk_reduce_add(chunk + (kD == 128 ? wg * kDqTileElems : 0), dqs, kDqTileElems * sizeof(float));
    tma::bulk_commit();
  }
}
#endif

// ---------------------------------------------------------------- forward

// Three warpgroups: the producer group's warp 0 copies K/V tiles into kKvStages stages (one thread
// through the tensor maps; the lanes copy the tiles' positions with cp.async and fill their S2 ids)
// and publishes each through a "full" mbarrier (the warp's 32 arrivals and the tiles' bytes); the
// other producer warps exit. The two consumer groups (64 query rows
// each) wait on it, compute, and hand the stage back through an "empty" mbarrier once their P V
// products on it are done. The consumer groups drift apart, so one group's exponentials can run
// beside the other's products. Registers move from the producer to the consumers (setmaxnreg:
// 168 per thread at launch; 56 producer, 224 consumer, the block's allocation exactly).
constexpr int kKvStages = 4;
constexpr int kForwardThreads = 3 * 128;
constexpr int kProducerRegs = 56, kConsumerRegs = 224;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= kForwardThreads * 168);

template <int kD>
__global__ void __launch_bounds__(kForwardThreads, 1)
    flash_forward_sm90_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                              const bf16* __restrict__ k, const bf16* __restrict__ v, AttentionDims n,
                              AttentionMask m, TileBounds tb, float scale, const __grid_constant__ CUtensorMap kmap,
                              const __grid_constant__ CUtensorMap vmap, AttentionGate gate) {
#if defined(LOOM_WGMMA)
  using Smem = QuerySmem<kD, 1, true, kKvStages>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t bars[2 * kKvStages];  // full[stage], then empty[stage]
  const Smem sm(smem_raw);
  const QueryBlock blk = query_block(n);
  const int wg = threadIdx.x / 128;

  // Prologue, every thread: the block's rows and positions, the barriers, the plan.
  load_panels_async<kD, kBlockRows, kForwardThreads>(sm.rows, q + blk.q_offset, blk.q_stride, blk.nq);
  if (m.q_pos != nullptr) load_vec_async<kBlockRows, kForwardThreads>(sm.qpos->pos, m.q_pos, blk.i0, n.T);
  cp_async_commit();
  if (threadIdx.x == 0) {
    for (int st = 0; st < kKvStages; ++st) {
      mbar_init(&bars[st], 32);               // the producer's warp 0
      mbar_init(&bars[kKvStages + st], 256);  // the consumers' threads
    }
    tma::mbar_init_fence();
  }
  const TilePlan plan = query_block_plan<kForwardThreads>(sm.plan, blk, n, m, tb);  // ends with a barrier
  cp_async_wait<0>();
  if (m.s2_block > 0) fill_s2<kBlockRows, kForwardThreads>(*sm.qpos, m, blk.hk);  // rows this thread copied
  wgmma::fence_smem();
  __syncthreads();

  if (wg == 0) {  // producer
    shrink_registers<kProducerRegs>();
    if (threadIdx.x >= 32) return;
    int64_t i = 0, prev_kt = -1;
    int prev = 0;
    // This lane's positions of tile t in stage st have landed: the S2 ids of the rows it copied,
    // then its arrival (the phase also waits for the tiles' bytes).
    auto publish = [&](int st, int64_t t) {
      if (m.s2_block > 0 && !(plan.plain(0, t) && plan.plain(1, t))) fill_s2<kTile, 32>(sm.kpos[st], m, blk.hk);
      mbar_arrive(&bars[st]);
    };
    for (int64_t kt = plan.next(0); kt < plan.count; kt = plan.next(kt + 1), ++i) {
      const int st = static_cast<int>(i % kKvStages);
      mbar_wait(&bars[kKvStages + st], static_cast<uint32_t>((i / kKvStages) & 1) ^ 1u);
      if (threadIdx.x == 0) {
        tma::mbar_expect_tx(&bars[st], 2 * kTile * kD * 2);
        tma::load_rows<kD, kTile>(sm.ks + st * Smem::kKvElems, &kmap, blk.b, kt * kTile, blk.hk, &bars[st]);
        tma::load_rows<kD, kTile>(sm.vs + st * Smem::kKvElems, &vmap, blk.b, kt * kTile, blk.hk, &bars[st]);
      }
      if (m.q_pos != nullptr) load_vec_async<kTile, 32>(sm.kpos[st].pos, m.k_pos, kt * kTile, n.S);
      cp_async_commit();
      if (i > 0) {
        cp_async_wait<1>();
        publish(prev, prev_kt);
      }
      prev = st;
      prev_kt = kt;
    }
    if (i > 0) {
      cp_async_wait<0>();
      publish(prev, prev_kt);
    }
    return;
  }

  grow_registers<kConsumerRegs>();
  const int cw = wg - 1, row0 = 16 * (threadIdx.x / 32 - 4);  // consumer group (64 rows), warp's first row
  const int lane = threadIdx.x % 32, nq = blk.nq;
  // This warp's 16 query rows as A fragments, loaded once: S = Q K^T then reads only K from
  // shared memory (half the bytes per product; 3% faster at 32K than both operands there).
  uint32_t qf[kD / 16][4];
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    ldsm_x4(qf[kk], sm.rows + wgmma::panel_index(row0 + lane % 16, 16 * kk + 8 * (lane / 16), kBlockRows));

  const float scale_log2 = scale * kLog2e;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float acc_o[kD / 8][4] = {};
  uint32_t pf[4][4];
  int pending = -1;
  // Tiles as wgmma::units: a stage's K and V tiles are constant offsets from the first stage's.
  const uint32_t ks_units = wgmma::units(sm.ks), vs_units = wgmma::units(sm.vs);
  constexpr uint32_t kKvUnits = Smem::kKvElems / 8;
  auto issue_pv = [&] { rs_products<kD>(acc_o, pf, vs_units + pending * kKvUnits); };
  auto finish_pv = [&] { rs_products_now<kD>(acc_o, pf, vs_units + pending * kKvUnits); };
  auto release = [&](int st) { mbar_arrive(&bars[kKvStages + st]); };
  int64_t i = 0;
  for (int64_t kt = plan.next(0); kt < plan.count; kt = plan.next(kt + 1), ++i) {
    const int st = static_cast<int>(i % kKvStages);
    mbar_wait(&bars[st], static_cast<uint32_t>((i / kKvStages) & 1));
    if (!plan.meet(cw, kt)) {  // nothing of this group's rows meets the tile
      if (pending >= 0) {
        finish_pv();
        release(pending);
        pending = -1;
      }
      release(st);
      continue;
    }
    float s[8][4];  // fresh: the first product runs with accumulate 0 (5% faster at 32K than zeroing)
    wgmma::pin(s);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)  // S = Q K^T
      wgmma::wgmma_rs_n64<0>(s, qf[kk], wgmma::kmajor_at(ks_units + st * kKvUnits, kTile, 0, 16 * kk),
                             kk > 0);
    wgmma::commit();
    if (pending >= 0) {
      issue_pv();  // the previous tile's O += P V, behind S
      wgmma::wait<1>();
    } else {
      wgmma::wait<0>();
    }
    wgmma::pin(s);
    if (!plan.plain(cw, kt))
      mask_scores(s, m, *sm.qpos, row0, nq, sm.kpos[st], rows_from(n.S, kt * kTile, kTile));
    float alpha[2];
    softmax_tile(s, row_max, row_sum, alpha, scale_log2);
    wgmma::wait<0>();
    wgmma::pin(acc_o);
    wgmma::pin(pf);
    if (pending >= 0) release(pending);  // its P V products are done
    rescale_rows<kD>(acc_o, alpha);
    c_to_a(pf, s);
    pending = st;
  }
  if (pending >= 0) finish_pv();
  finish_query_rows<kD>(acc_o, lse + (blk.b * n.H + blk.h) * n.T + blk.i0, row_max, row_sum, row0, nq, scale);
  store_out_rows<kD>(out, gate, blk.q_offset, blk.q_stride, row0, nq, acc_o);
#else
  __trap();  // launched only where wgmma_available()
#endif
}

// ---------------------------------------------------------------- backward dK dV

// Thread 0 copies each unit's Q and dO through the tensor maps qmap and dmap, completing on the
// stage's mbarrier, which every thread waits on before the unit (5% faster at 32K than every
// thread's cp.async, 9% under S2); the threads copy lse, delta and positions with cp.async.
template <int kD>
__global__ void __launch_bounds__(kThreads, 1)
    flash_dkdv_sm90_kernel(bf16* __restrict__ dk, bf16* __restrict__ dv, float* __restrict__ dq_acc,
                           const float* __restrict__ lse, const float* __restrict__ delta,
                           const bf16* __restrict__ k, const bf16* __restrict__ v, AttentionDims n, AttentionMask m, TileBounds tb,
                           float scale, int64_t pair, const __grid_constant__ CUtensorMap qmap,
                           const __grid_constant__ CUtensorMap dmap) {
#if defined(LOOM_WGMMA)
  static_assert(kThreads == 2 * 128 && kBlockRows == kKeys);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t full[2];  // a stage's Q and dO have landed
  using Smem = Sm90Smem<kD>;
  const Smem sm(smem_raw);
  const KeyBlock kb(n, kKeys, pair, m.s2_offset);
  // Broadcast from lane 0, so the compiler may treat the warp (and the products' descriptors
  // derived from it) as the same over the warp: uniform registers, fewer moves into them.
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 32), 0);
  const int wg = warp / 4, row0 = 16 * warp;  // this warp's group (64-key half) and first key
  // The tiles as wgmma::units: constant offsets from the keys' tile, a stage's from the first's.
  const uint32_t ks_u = wgmma::units(sm.ks), vs_u = wgmma::units(sm.vs), qs_u = wgmma::units(sm.qs),
                 dos_u = wgmma::units(sm.dos), ds_u = wgmma::units(sm.ds);
  constexpr uint32_t kQueryUnits = Smem::kQueryElems / 8, kDsUnits = Smem::kDsElems / 8;
  const int nk = kb.nk;

  issue_block_keys<kD, kThreads>(sm.ks, sm.vs, *sm.kpos, kb, k, v, n, m);
  cp_async_commit();
  if (threadIdx.x == 0) {  // published by the plan's barrier; thread 0 issues the first copies itself
    mbar_init(&full[0], 1);
    mbar_init(&full[1], 1);
    tma::mbar_init_fence();
  }
  const TilePlan plan = kb.plan<kThreads, 2>(sm.plan, n, m, tb);
  auto issue = [&](QueryUnit unit, int stage) {
    if (threadIdx.x == 0) {
      const int64_t t0 = int64_t{unit.t} * kTile;
      tma::mbar_arrive_expect_tx(&full[stage], 2 * kTile * kD * 2);
      tma::load_rows<kD, kTile>(sm.qs + stage * Smem::kQueryElems, &qmap, kb.b, t0, kb.head(unit), &full[stage]);
      tma::load_rows<kD, kTile>(sm.dos + stage * Smem::kQueryElems, &dmap, kb.b, t0, kb.head(unit), &full[stage]);
    }
    kb.issue_vectors<kThreads>(sm.qpos[stage], sm.lse + stage * kTile, sm.delta + stage * kTile, lse, delta, unit,
                               n, m);
  };

  const float scale_log2 = scale * kLog2e;
  float acc_dk[kD / 8][4] = {}, acc_dv[kD / 8][4] = {};
  // Units from the last query tile down: blocks that start together walk the same query tiles
  // together (under S2 with s2_block_slot's order: 78 ms against 99 for the dK dV pass at 128K, the
  // L2 hit rate 86% against 28%; dense 32K 0.7% faster). Units are stepped as (head, tile) pairs:
  // no 64-bit division per unit.
  QueryUnit unit{static_cast<int>(kb.group) - 1, static_cast<int>(kb.q_tiles) - 1};
  bool have = kb.prev(plan, unit);
  if (have) issue(unit, 0);
  cp_async_commit();
  int stage = 0;
  QueryUnit prev_unit{0, 0};  // the unit whose dQ is still to add, whether this group adds
  bool prev_adds = false;
  uint32_t phase = 0;  // of stage 0's barrier, then flipped each time stage 0 comes round
  // Whether S2 needs per-element masks somewhere on unit u's query tile (then its S2 ids are filled).
  auto masked_unit = [&](QueryUnit u) { return m.s2_block > 0 && !(plan.plain(0, u.t) && plan.plain(1, u.t)); };
  // Stage 1's dS^T tile zeroed: the first unit's "previous" dQ products read it (not added).
  for (int i = threadIdx.x; i < Smem::kDsElems / 8; i += kThreads)
    reinterpret_cast<uint4*>(sm.ds + Smem::kDsElems)[i] = make_uint4(0, 0, 0, 0);
  // The first unit's rows, the keys and their S2 ids in place.
  cp_async_wait<0>();
  wgmma::fence_smem();
  __syncthreads();
  if (m.s2_block > 0) {
    fill_s2<kKeys>(*sm.kpos, m, kb.hk);
    if (have && masked_unit(unit)) fill_s2<kTile>(sm.qpos[0], m, kb.hk);
    __syncthreads();
  }
  while (have) {
    QueryUnit next{unit.g, unit.t - 1};
    const bool have_next = kb.prev(plan, next);
    if (have_next) issue(next, stage ^ 1);  // free since the last unit's barrier
    cp_async_commit();
    mbar_wait(&full[stage], phase);  // this unit's Q and dO (every thread waits on every phase)
    if (stage == 1) phase ^= 1u;
    const int qt = unit.t;
    // One dS^T tile per stage, so the next unit's rows can be written while the other group's dQ
    // products still read this unit's.
    bf16* const ds_s = sm.ds + stage * Smem::kDsElems;
    const UnitRows rows{qs_u + stage * kQueryUnits, dos_u + stage * kQueryUnits,
                        sm.lse + stage * kTile, sm.delta + stage * kTile, &sm.qpos[stage],
                        rows_from(n.T, int64_t{qt} * kTile, kTile)};
    // The previous unit's dQ products (its dS^T tiles in the other stage; for the first unit, on
    // zeros, not added), their reduction once this unit's S^T is issued.
    float acc_dq[8][4];
    key_group_dq_issue<kD>(acc_dq, ds_u + (stage ^ 1) * kDsUnits, ks_u, wg);
    auto add_prev = [&] {
      wgmma::wait<1>();  // the dQ batch; S^T may still run
      wgmma::pin(acc_dq);
      key_group_dq_reduce<kD>(dq_acc + kb.dq_chunk(prev_unit, n), sm.dqs + wg * kDqTileElems, acc_dq, prev_adds, wg,
                              warp % 4, scale);
    };
    // Every group runs every unit of the block, P = 0 where it does not meet the tile: products
    // under a branch while a batch is in flight make ptxas serialize every product of the kernel
    // (and such a group would only wait at the barrier for the other).
    key_group_unit<kD>(acc_dk, acc_dv, ks_u, vs_u, rows, ds_s, scale_log2, plan.meet(wg, qt), !plan.plain(wg, qt),
                       m, *sm.kpos, wg, row0, nk, add_prev);
    // The next unit's rows (issued at the top): this thread's copies have landed, and it fills
    // the S2 ids of the query rows whose positions it copied itself (the same rows, kThreads).
    // The dQ reduction issued at this unit's top has read the staging tile.
    if (threadIdx.x % 128 == 0) tma::bulk_read_wait<0>();
    cp_async_wait<0>();
    if (have_next && masked_unit(next)) fill_s2<kTile>(sm.qpos[stage ^ 1], m, kb.hk);
    wgmma::fence_smem();  // the dS^T rows and the next unit's copies, before the products read them
    __syncthreads();  // the block's one barrier per unit
    // dQ of the unit, over the keys of the halves that met the tile, at the next unit.
    prev_unit = unit;
    prev_adds = kD == 128 ? plan.meet(0, qt) || plan.meet(1, qt) : plan.meet(wg, qt);
    // No barrier before the next unit: this stage is refilled after this unit's barrier, which
    // every group reaches only once its products on the stage are complete.
    unit = next;
    have = have_next;
    stage ^= 1;
  }
  {  // the last unit's dQ (its dS^T tiles in the stage before `stage`; products unconditional, as above)
    float acc_dq[8][4];
    key_group_dq_issue<kD>(acc_dq, ds_u + (stage ^ 1) * kDsUnits, ks_u, wg);
    wgmma::wait<0>();
    wgmma::pin(acc_dq);
    key_group_dq_reduce<kD>(dq_acc + kb.dq_chunk(prev_unit, n), sm.dqs + wg * kDqTileElems, acc_dq, prev_adds, wg,
                            warp % 4, scale);
    if (threadIdx.x % 128 == 0) tma::bulk_wait<0>();  // complete before the block exits
  }
  cp_async_wait<0>();
  kb.store_grads<kD>(dk, dv, row0, acc_dk, acc_dv, scale, n);
#else
  __trap();  // launched only where wgmma_available()
#endif
}

}  // namespace

void flash::launch_flash_forward_sm90(void* out, float* lse, const void* q, const void* k, const void* v,
                                      const AttentionGate& gate,
                                      const AttentionDims& n, const AttentionMask& mask, const TileBounds& tb,
                                      float scale, cudaStream_t stream) {
  dispatch_flash_head_dim(n.D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    const CUtensorMap kmap = rows_tensor_map(k, n.B, n.S, n.Hkv, n.D, kTile);
    const CUtensorMap vmap = rows_tensor_map(v, n.B, n.S, n.Hkv, n.D, kTile);
    auto kernel = flash_forward_sm90_kernel<kD>;
    const size_t smem = QuerySmem<kD, 1, true, kKvStages>::bytes(tiles_of(n.S));
    set_smem(kernel, smem);
    kernel<<<flash_grid(blocks_of(n.T), n.H, n.B), kForwardThreads, smem, stream>>>(
        static_cast<bf16*>(out), lse, static_cast<const bf16*>(q), static_cast<const bf16*>(k),
        static_cast<const bf16*>(v), n, mask, tb, scale, kmap, vmap, gate);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void flash::launch_flash_dkdv_sm90(void* dk, void* dv, float* dq_acc, const void* dout, const float* lse,
                                   const float* delta, const void* q, const void* k, const void* v,
                                   const AttentionDims& n, const AttentionMask& mask, const TileBounds& tb,
                                   float scale, cudaStream_t stream) {
  // S2 blocks of one tile: pair each chunk's strided tiles vert_stride apart and its local tiles
  // in order (key_tiles_of), so both groups of a block have nearly the same work.
  const int64_t pair = mask.s2_block == kTile ? mask.s2_stride : 1;
  dispatch_flash_head_dim(n.D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    const size_t smem = Sm90Smem<kD>::bytes(tiles_of(n.T));
    const dim3 grid = flash_grid((n.S + kKeys - 1) / kKeys, n.Hkv, n.B);
    const CUtensorMap qmap = rows_tensor_map(q, n.B, n.T, n.H, n.D, kTile);
    const CUtensorMap dmap = rows_tensor_map(dout, n.B, n.T, n.H, n.D, kTile);
    auto kernel = flash_dkdv_sm90_kernel<kD>;
    set_smem(kernel, smem);
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<bf16*>(dk), static_cast<bf16*>(dv), dq_acc, lse, delta,
                                             static_cast<const bf16*>(k), static_cast<const bf16*>(v), n, mask, tb,
                                             scale, pair, qmap, dmap);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace loom::cuda::detail
