// Softmax attention kernels on CUDA cores, fp32 math (the interim path; the
// fused tensor-core kernels of issue 7 replace them behind the same entry
// points). Tiling, with 32-row tiles and 8 warps of 4 rows each:
//   forward  one block per (32-query tile, head): keys stream through shared
//            memory 32 at a time; lane j scores key j against the warp's 4 rows,
//            an online softmax (fp32 max and sum) rescales the accumulator, and
//            P V is summed with p broadcast by shuffles (lane owns D/32 columns).
//   backward a delta pre-pass (rowsum(dout * out) - dlse), then two race-free
//            passes: dq per query tile over key tiles, and dk, dv per key tile
//            over all query rows of its GQA group. No atomics: every output is
//            written by one thread in a fixed order, so results are
//            deterministic (p is recomputed in both passes, as in the CPU twin).
// A key tile whose smallest position exceeds the query tile's largest is
// skipped under the causal mask (positions may be any i64, e.g. zigzag), and
// under S2 a tile pair with no possibly active block pair is skipped too (so
// S2 costs about its active blocks, at 32-token tile granularity).
// Rows are zero-padded on chip to 32, 64 or 128 columns, so any D <= 128 works.
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/attention_mask.cuh"
#include "kernels/cuda/common.cuh"

#include <cstdint>
#include <limits>

namespace loom::cuda::detail {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int kTile = kWarps * kRowsPerWarp;  // query rows per block and keys per tile
static_assert(kTile == 32, "one key per lane");
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ int64_t warp_min_i64(int64_t v) {
  for (int o = 16; o > 0; o /= 2) {
    const int64_t other = __shfl_xor_sync(kFull, static_cast<long long>(v), o);
    v = other < v ? other : v;
  }
  return v;
}
__device__ __forceinline__ int64_t warp_max_i64(int64_t v) {
  for (int o = 16; o > 0; o /= 2) {
    const int64_t other = __shfl_xor_sync(kFull, static_cast<long long>(v), o);
    v = other > v ? other : v;
  }
  return v;
}
__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// Positions of one 32-row tile in shared memory: raw position, S2 block index,
// and (keys only) whether the key block is on this kv head's strided shard.
struct TilePositions {
  int64_t pos[kTile];
  int64_t block[kTile];
  bool strided[kTile];
  bool valid[kTile];  // row inside the sequence
};

// Thread t < 32 loads entry `start + t` (rows past `count` get `fill`).
__device__ __forceinline__ void load_positions(TilePositions& tp, const int64_t* src, int64_t start, int64_t count,
                                               int64_t fill, const AttentionMask& m, int64_t hk) {
  if (threadIdx.x >= kTile || src == nullptr) return;
  const int64_t idx = start + threadIdx.x;
  const bool valid = idx < count;
  const int64_t p = valid ? src[idx] : fill;
  tp.pos[threadIdx.x] = p;
  tp.valid[threadIdx.x] = valid;
  if (m.s2_block > 0) {  // rows past `count` are masked elsewhere; their block fields are never used
    const int64_t blk = valid ? div_pos(p, m.s2_block) : 0;
    tp.block[threadIdx.x] = blk;
    tp.strided[threadIdx.x] = valid && s2_strided(m, blk, hk);
  }
}

// The CPU twin's visibility rule for query row qi and key kj of the tiles.
__device__ __forceinline__ bool visible(const AttentionMask& m, const TilePositions& qp, int qi,
                                        const TilePositions& kp, int kj) {
  return pair_visible(m, qp.pos[qi], kp.pos[kj], qp.block[qi], kp.block[kj], kp.strided[kj]);
}

// False when no (query, key) pair of the two tiles can be on an active S2
// block pair (then the tile pair is skipped); conservative, so true may still
// mean all hidden. Every lane of the warp must call it; all warps agree.
__device__ __forceinline__ bool s2_tiles_may_meet(const AttentionMask& m, const TilePositions& qp,
                                                  const TilePositions& kp, int lane) {
  const bool qv = qp.valid[lane], kv = kp.valid[lane];
  const int64_t i_min = warp_min_i64(qv ? qp.block[lane] : std::numeric_limits<int64_t>::max());
  const int64_t i_max = warp_max_i64(qv ? qp.block[lane] : std::numeric_limits<int64_t>::min());
  const int64_t j_min = warp_min_i64(kv ? kp.block[lane] : std::numeric_limits<int64_t>::max());
  const int64_t j_max = warp_max_i64(kv ? kp.block[lane] : std::numeric_limits<int64_t>::min());
  if (j_min > i_max) return false;  // every key block lies after every query block
  // Every pair is outside the local window, and no key block is on the strided shard.
  if (i_min - j_max >= m.s2_local && !__any_sync(kFull, kv && kp.strided[lane])) return false;
  return true;
}

// dst (32, kD) with row stride `stride` floats <- `rows` rows of src (row
// stride src_stride elements, D used columns); the rest is zero. src may be null (zeros).
template <typename T, int kD>
__device__ __forceinline__ void load_tile(float* dst, int stride, const T* src, int64_t src_stride, int64_t rows,
                                          int64_t D) {
  for (int e = threadIdx.x; e < kTile * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    dst[r * stride + d] = (src != nullptr && r < rows && d < D) ? to_float(src[r * src_stride + d]) : 0.f;
  }
}

// sum over d of a[d] * b[d] for two rows in shared memory (16-byte aligned).
template <int kD>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
  const float4* a4 = reinterpret_cast<const float4*>(a);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  float s = 0.f;
#pragma unroll 8
  for (int i = 0; i < kD / 4; ++i) {
    const float4 x = a4[i], y = b4[i];
    s += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
  }
  return s;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 2)
    attention_forward_kernel(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                             const T* __restrict__ k, const T* __restrict__ v, AttentionDims n, AttentionMask mask,
                             float scale) {
  constexpr int kL = kD / 32, kP = kD + 4;
  extern __shared__ float4 smem_f4[];
  float* qs = reinterpret_cast<float*>(smem_f4);  // (32, kD)  query rows
  float* ks = qs + kTile * kD;                     // (32, kP)  keys, one per lane
  float* vs = ks + kTile * kP;                     // (32, kD)  values
  __shared__ TilePositions qp, kp;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t hk = h / (n.H / n.Hkv), rows = min_i64(kTile, n.T - i0);
  const int64_t q_stride = n.H * n.D, kv_stride = n.Hkv * n.D;

  load_tile<T, kD>(qs, kD, q + ((b * n.T + i0) * n.H + h) * n.D, q_stride, rows, n.D);
  load_positions(qp, mask.q_pos, i0, n.T, std::numeric_limits<int64_t>::min(), mask, hk);
  __syncthreads();
  const int64_t q_max = mask.causal ? warp_max_i64(qp.pos[lane]) : 0;

  float m_row[kRowsPerWarp], l_row[kRowsPerWarp], acc[kRowsPerWarp][kL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m_row[r] = kNegInf;
    l_row[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kL; ++c) acc[r][c] = 0.f;
  }
  for (int64_t j0 = 0; j0 < n.S; j0 += kTile) {
    const int64_t keys = min_i64(kTile, n.S - j0);
    __syncthreads();  // the previous tile is consumed
    load_positions(kp, mask.k_pos, j0, n.S, std::numeric_limits<int64_t>::max(), mask, hk);
    __syncthreads();
    if (mask.causal && warp_min_i64(kp.pos[lane]) > q_max) continue;  // same answer in every warp
    if (mask.s2_block > 0 && !s2_tiles_may_meet(mask, qp, kp, lane)) continue;
    load_tile<T, kD>(ks, kP, k + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, keys, n.D);
    load_tile<T, kD>(vs, kD, v + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, keys, n.D);
    __syncthreads();
    float p[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const float s = dot_row<kD>(qs + row * kD, ks + lane * kP);
      const bool vis = lane < keys && (mask.q_pos == nullptr || visible(mask, qp, row, kp, lane));
      const float sc = vis ? s * scale : kNegInf;
      const float m_new = fmaxf(m_row[r], warp_max(sc));
      float corr = 1.f;
      p[r] = 0.f;
      if (m_new != kNegInf) {
        corr = expf(m_row[r] - m_new);  // 0 when nothing was seen before
        p[r] = expf(sc - m_new);        // 0 for hidden keys
      }
      m_row[r] = m_new;
      l_row[r] = l_row[r] * corr + p[r];  // per-lane partial; summed over lanes at the end
#pragma unroll
      for (int c = 0; c < kL; ++c) acc[r][c] *= corr;
    }
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float vj[kL];
#pragma unroll
      for (int c = 0; c < kL; ++c) vj[c] = vs[j * kD + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float pj = __shfl_sync(kFull, p[r], j);
#pragma unroll
        for (int c = 0; c < kL; ++c) acc[r][c] += pj * vj[c];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= n.T) continue;  // uniform over the warp
    const float l = warp_sum(l_row[r]);
    const bool empty = m_row[r] == kNegInf;
    const float inv = empty ? 0.f : 1.f / l;
    T* o = out + ((b * n.T + i) * n.H + h) * n.D;
#pragma unroll
    for (int c = 0; c < kL; ++c) {
      const int d = lane + 32 * c;
      if (d < n.D) o[d] = from_float<T>(acc[r][c] * inv);
    }
    if (lane == 0) lse[(b * n.H + h) * n.T + i] = empty ? kNegInf : m_row[r] + logf(l);
  }
}

// delta (B, H, T) = rowsum(dout * out) - dlse: the term subtracted from dp in ds.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_delta_kernel(float* __restrict__ delta, const T* __restrict__ dout, const T* __restrict__ out,
                           const float* __restrict__ dlse, AttentionDims n) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // (b, h, i) flattened
  if (row >= n.B * n.H * n.T) return;
  const int lane = threadIdx.x % 32;
  const int64_t i = row % n.T, h = (row / n.T) % n.H, b = row / (n.T * n.H);
  float s = 0.f;
  if (dout != nullptr) {
    const int64_t base = ((b * n.T + i) * n.H + h) * n.D;
    for (int64_t d = lane; d < n.D; d += 32) s += to_float(dout[base + d]) * to_float(out[base + d]);
  }
  s = warp_sum(s);
  if (lane == 0) delta[row] = s - (dlse != nullptr ? dlse[row] : 0.f);
}

// ---- the output gate (AttentionGate) where the flash epilogue does not apply it, and the gated
// backward's pre-pass. A warp per (token, head) row r, token-major ((b, i, h) flattened: the row's
// first element is r * D, its per-row gate values z[r], w[r]).

// The per-row factor w[r] sigmoid(z[r]) (1 for what the gate does not hold per row).
template <typename T>
__device__ __forceinline__ float row_gate(const AttentionGate& g, int64_t r) {
  float f = g.w != nullptr ? to_float(static_cast<const T*>(g.w)[r]) : 1.f;
  if (g.z != nullptr && g.z_per_row) f *= sigmoidf(to_float(static_cast<const T*>(g.z)[r]));
  return f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_gate_apply_kernel(T* __restrict__ out, const T* __restrict__ ungated, AttentionGate g, AttentionDims n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= n.B * n.T * n.H) return;
  const float rg = row_gate<T>(g, r);
  const T* z = g.z_per_row ? nullptr : static_cast<const T*>(g.z);  // elementwise z
  for (int64_t e = r * n.D + threadIdx.x % 32; e < (r + 1) * n.D; e += 32)
    out[e] = from_float<T>(to_float(ungated[e]) * (z != nullptr ? rg * sigmoidf(to_float(z[e])) : rg));
}

// dout = g dy; dz, dw, delta (attention_launch.h: launch_attention_gate_prepass).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_gate_prepass_kernel(T* __restrict__ dout, T* __restrict__ dz, T* __restrict__ dw,
                                  float* __restrict__ delta, const T* __restrict__ dy, const T* __restrict__ y,
                                  const float* __restrict__ dlse, AttentionGate g, AttentionDims n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= n.B * n.T * n.H) return;
  const int lane = threadIdx.x % 32;
  const T* z = static_cast<const T*>(g.z);
  const T* o = static_cast<const T*>(g.ungated);
  const float w = g.w != nullptr ? to_float(static_cast<const T*>(g.w)[r]) : 1.f;
  const float zr = z != nullptr && g.z_per_row ? sigmoidf(to_float(z[r])) : 1.f;
  float dyy = 0.f, dyo = 0.f;  // sums over the row of dy y and dy o sigmoid(z)
  for (int64_t e = r * n.D + lane; e < (r + 1) * n.D; e += 32) {
    const float dye = to_float(dy[e]), dyye = dye * to_float(y[e]);
    float ge = zr;  // sigmoid(z) of this element
    if (z != nullptr && !g.z_per_row) {
      ge = sigmoidf(to_float(z[e]));
      if (dz != nullptr) dz[e] = from_float<T>((1.f - ge) * dyye);
    }
    dyy += dyye;
    if (dw != nullptr) dyo += dye * to_float(o[e]) * ge;
    dout[e] = from_float<T>(dye * ge * w);
  }
  dyy = warp_sum(dyy);
  if (dw != nullptr) dyo = warp_sum(dyo);
  if (lane != 0) return;
  if (dz != nullptr && g.z_per_row) dz[r] = from_float<T>((1.f - zr) * dyy);
  if (dw != nullptr) dw[r] = from_float<T>(dyo);
  if (delta != nullptr) {
    const int64_t h = r % n.H, i = (r / n.H) % n.T, b = r / (n.H * n.T), row = (b * n.H + h) * n.T + i;
    delta[row] = dyy - (dlse != nullptr ? dlse[row] : 0.f);
  }
}

// dq for one 32-query tile of one head: dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 2)
    attention_backward_dq_kernel(T* __restrict__ dq, const T* __restrict__ dout, const float* __restrict__ lse,
                                 const float* __restrict__ delta, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, AttentionDims n, AttentionMask mask, float scale) {
  constexpr int kL = kD / 32, kP = kD + 4;
  extern __shared__ float4 smem_f4[];
  float* qs = reinterpret_cast<float*>(smem_f4);  // (32, kD)
  float* dos = qs + kTile * kD;                    // (32, kD)
  float* ks = dos + kTile * kD;                    // (32, kP)
  float* vs = ks + kTile * kP;                      // (32, kP)
  __shared__ TilePositions qp, kp;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t hk = h / (n.H / n.Hkv), rows = min_i64(kTile, n.T - i0);
  const int64_t q_stride = n.H * n.D, kv_stride = n.Hkv * n.D;

  load_tile<T, kD>(qs, kD, q + ((b * n.T + i0) * n.H + h) * n.D, q_stride, rows, n.D);
  load_tile<T, kD>(dos, kD, dout == nullptr ? nullptr : dout + ((b * n.T + i0) * n.H + h) * n.D, q_stride, rows, n.D);
  load_positions(qp, mask.q_pos, i0, n.T, std::numeric_limits<int64_t>::min(), mask, hk);
  float row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], acc[kRowsPerWarp][kL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    row_lse[r] = i < n.T ? lse[(b * n.H + h) * n.T + i] : kNegInf;
    row_delta[r] = i < n.T ? delta[(b * n.H + h) * n.T + i] : 0.f;
#pragma unroll
    for (int c = 0; c < kL; ++c) acc[r][c] = 0.f;
  }
  __syncthreads();
  const int64_t q_max = mask.causal ? warp_max_i64(qp.pos[lane]) : 0;

  for (int64_t j0 = 0; j0 < n.S; j0 += kTile) {
    const int64_t keys = min_i64(kTile, n.S - j0);
    __syncthreads();
    load_positions(kp, mask.k_pos, j0, n.S, std::numeric_limits<int64_t>::max(), mask, hk);
    __syncthreads();
    if (mask.causal && warp_min_i64(kp.pos[lane]) > q_max) continue;
    if (mask.s2_block > 0 && !s2_tiles_may_meet(mask, qp, kp, lane)) continue;
    load_tile<T, kD>(ks, kP, k + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, keys, n.D);
    load_tile<T, kD>(vs, kP, v + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, keys, n.D);
    __syncthreads();
    float ds[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const bool vis = lane < keys && row_lse[r] != kNegInf &&
                       (mask.q_pos == nullptr || visible(mask, qp, row, kp, lane));
      ds[r] = 0.f;
      if (vis) {
        const float p = expf(dot_row<kD>(qs + row * kD, ks + lane * kP) * scale - row_lse[r]);
        ds[r] = p * (dot_row<kD>(dos + row * kD, vs + lane * kP) - row_delta[r]);
      }
    }
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float kj[kL];
#pragma unroll
      for (int c = 0; c < kL; ++c) kj[c] = ks[j * kP + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float dsj = __shfl_sync(kFull, ds[r], j);
#pragma unroll
        for (int c = 0; c < kL; ++c) acc[r][c] += dsj * kj[c];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= n.T) continue;
    T* g = dq + ((b * n.T + i) * n.H + h) * n.D;
#pragma unroll
    for (int c = 0; c < kL; ++c) {
      const int d = lane + 32 * c;
      if (d < n.D) g[d] = from_float<T>(scale * acc[r][c]);
    }
  }
}

// dk, dv for one 32-key tile of one kv head, summed over the query heads of
// its group and every query tile: dv_j = sum_i p_ij dout_i,
// dk_j = scale * sum_i p_ij (dp_ij - delta_i) q_i. Warp w owns keys 4w..4w+3;
// lane i scores query i of the streamed tile.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_dkdv_kernel(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   AttentionDims n, AttentionMask mask, float scale) {
  constexpr int kL = kD / 32, kP = kD + 4;
  extern __shared__ float4 smem_f4[];
  float* ks = reinterpret_cast<float*>(smem_f4);  // (32, kD)  this block's keys
  float* vs = ks + kTile * kD;                     // (32, kD)
  float* qs = vs + kTile * kD;                     // (32, kP)  streamed queries, one per lane
  float* dos = qs + kTile * kP;                    // (32, kP)
  __shared__ TilePositions qp, kp;
  __shared__ float tile_lse[kTile], tile_delta[kTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z, hk = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t group = n.H / n.Hkv, keys = min_i64(kTile, n.S - j0);
  const int64_t q_stride = n.H * n.D, kv_stride = n.Hkv * n.D;

  load_tile<T, kD>(ks, kD, k + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, keys, n.D);
  load_tile<T, kD>(vs, kD, v + ((b * n.S + j0) * n.Hkv + hk) * n.D, kv_stride, keys, n.D);
  load_positions(kp, mask.k_pos, j0, n.S, std::numeric_limits<int64_t>::max(), mask, hk);
  __syncthreads();
  const int64_t k_min = mask.causal ? warp_min_i64(kp.pos[lane]) : 0;

  float acc_k[kRowsPerWarp][kL], acc_v[kRowsPerWarp][kL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int c = 0; c < kL; ++c) acc_k[r][c] = acc_v[r][c] = 0.f;

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < n.T; i0 += kTile) {
      const int64_t rows = min_i64(kTile, n.T - i0);
      __syncthreads();
      load_positions(qp, mask.q_pos, i0, n.T, std::numeric_limits<int64_t>::min(), mask, hk);
      if (threadIdx.x < kTile) {
        const int64_t i = i0 + threadIdx.x;
        tile_lse[threadIdx.x] = i < n.T ? lse[(b * n.H + h) * n.T + i] : kNegInf;
        tile_delta[threadIdx.x] = i < n.T ? delta[(b * n.H + h) * n.T + i] : 0.f;
      }
      __syncthreads();
      if (mask.causal && warp_max_i64(qp.pos[lane]) < k_min) continue;
      if (mask.s2_block > 0 && !s2_tiles_may_meet(mask, qp, kp, lane)) continue;
      load_tile<T, kD>(qs, kP, q + ((b * n.T + i0) * n.H + h) * n.D, q_stride, rows, n.D);
      load_tile<T, kD>(dos, kP, dout == nullptr ? nullptr : dout + ((b * n.T + i0) * n.H + h) * n.D, q_stride, rows,
                       n.D);
      __syncthreads();
      float p[kRowsPerWarp], ds[kRowsPerWarp];
      const float my_lse = tile_lse[lane], my_delta = tile_delta[lane];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int key = warp * kRowsPerWarp + r;
        const bool vis = my_lse != kNegInf && (mask.q_pos == nullptr || visible(mask, qp, lane, kp, key));
        p[r] = ds[r] = 0.f;
        if (vis) {
          p[r] = expf(dot_row<kD>(qs + lane * kP, ks + key * kD) * scale - my_lse);
          ds[r] = p[r] * (dot_row<kD>(dos + lane * kP, vs + key * kD) - my_delta);
        }
      }
#pragma unroll 1
      for (int i = 0; i < kTile; ++i) {
        float qi[kL], doi[kL];
#pragma unroll
        for (int c = 0; c < kL; ++c) {
          qi[c] = qs[i * kP + lane + 32 * c];
          doi[c] = dos[i * kP + lane + 32 * c];
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float pi = __shfl_sync(kFull, p[r], i), dsi = __shfl_sync(kFull, ds[r], i);
#pragma unroll
          for (int c = 0; c < kL; ++c) {
            acc_v[r][c] += pi * doi[c];
            acc_k[r][c] += dsi * qi[c];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t j = j0 + warp * kRowsPerWarp + r;
    if (j >= n.S) continue;
    const int64_t base = ((b * n.S + j) * n.Hkv + hk) * n.D;
#pragma unroll
    for (int c = 0; c < kL; ++c) {
      const int d = lane + 32 * c;
      if (d < n.D) {
        dk[base + d] = from_float<T>(scale * acc_k[r][c]);
        dv[base + d] = from_float<T>(acc_v[r][c]);
      }
    }
  }
}

// Dynamic shared memory of each kernel (floats): three or four 32-row tiles.
template <int kD>
constexpr size_t forward_smem() { return sizeof(float) * kTile * (2 * kD + (kD + 4)); }
template <int kD>
constexpr size_t backward_smem() { return sizeof(float) * kTile * (2 * kD + 2 * (kD + 4)); }

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Calls fn.template operator()<kD>() with the padded head dim for D.
template <typename Fn>
void dispatch_head_dim(int64_t D, Fn&& fn) {
  if (D <= 32) fn(std::integral_constant<int, 32>{});
  else if (D <= 64) fn(std::integral_constant<int, 64>{});
  else if (D <= 128) fn(std::integral_constant<int, 128>{});
  else LOOM_FAIL() << "attention (CUDA): head dim D = " << D << " is above " << kMaxAttentionHeadDim;
}

template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  if (dtype == DType::f32) fn(float{});
  else if (dtype == DType::bf16) fn(__nv_bfloat16{});
  else LOOM_FAIL() << "attention (CUDA): dtype " << dtype << " is not supported (f32, bf16)";
}

unsigned blocks_of(int64_t rows) { return static_cast<unsigned>((rows + kTile - 1) / kTile); }

}  // namespace

void launch_attention_forward(DType dtype, void* out, float* lse, const void* q, const void* k, const void* v,
                              const AttentionDims& n, const AttentionMask& mask, float scale, cudaStream_t stream) {
  if (n.B == 0 || n.H == 0 || n.T == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(n.D, [&](auto kd) {
      constexpr int kD = decltype(kd)::value;
      auto kernel = attention_forward_kernel<T, kD>;
      set_smem(kernel, forward_smem<kD>());
      dim3 grid(blocks_of(n.T), static_cast<unsigned>(n.H), static_cast<unsigned>(n.B));
      kernel<<<grid, kThreads, forward_smem<kD>(), stream>>>(static_cast<T*>(out), lse, static_cast<const T*>(q),
                                                              static_cast<const T*>(k), static_cast<const T*>(v), n,
                                                              mask, scale);
      LOOM_CUDA_CHECK(cudaGetLastError());
    });
  });
}

void launch_attention_delta(DType dtype, float* delta, const void* dout, const void* out, const float* dlse,
                            const AttentionDims& n, cudaStream_t stream) {
  const int64_t rows = n.B * n.H * n.T;
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    attention_delta_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        delta, static_cast<const T*>(dout), static_cast<const T*>(out), dlse, n);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void launch_attention_gate_apply(DType dtype, void* out, const void* ungated, const AttentionGate& gate,
                                 const AttentionDims& n, cudaStream_t stream) {
  const int64_t rows = n.B * n.T * n.H;
  if (rows == 0 || n.D == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    attention_gate_apply_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(ungated), gate, n);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void launch_attention_gate_prepass(DType dtype, void* dout, void* dz, void* dw, float* delta, const void* dy,
                                   const void* y, const float* dlse, const AttentionGate& gate,
                                   const AttentionDims& n, cudaStream_t stream) {
  const int64_t rows = n.B * n.T * n.H;
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    attention_gate_prepass_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        static_cast<T*>(dout), static_cast<T*>(dz), static_cast<T*>(dw), delta, static_cast<const T*>(dy),
        static_cast<const T*>(y), dlse, gate, n);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void launch_attention_backward(DType dtype, void* dq, void* dk, void* dv, float* delta, const void* dout,
                               const float* dlse, const void* q, const void* k, const void* v, const void* out,
                               const float* lse, const AttentionDims& n, const AttentionMask& mask, float scale,
                               cudaStream_t stream) {
  if (n.B == 0 || n.H == 0) return;
  launch_attention_delta(dtype, delta, dout, out, dlse, n, stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(n.D, [&](auto kd) {
      constexpr int kD = decltype(kd)::value;
      if (n.T > 0) {
        auto kernel = attention_backward_dq_kernel<T, kD>;
        set_smem(kernel, backward_smem<kD>());
        dim3 grid(blocks_of(n.T), static_cast<unsigned>(n.H), static_cast<unsigned>(n.B));
        kernel<<<grid, kThreads, backward_smem<kD>(), stream>>>(
            static_cast<T*>(dq), static_cast<const T*>(dout), lse, delta, static_cast<const T*>(q),
            static_cast<const T*>(k), static_cast<const T*>(v), n, mask, scale);
        LOOM_CUDA_CHECK(cudaGetLastError());
      }
      if (n.S > 0) {
        auto kernel = attention_backward_dkdv_kernel<T, kD>;
        set_smem(kernel, backward_smem<kD>());
        dim3 grid(blocks_of(n.S), static_cast<unsigned>(n.Hkv), static_cast<unsigned>(n.B));
        kernel<<<grid, kThreads, backward_smem<kD>(), stream>>>(
            static_cast<T*>(dk), static_cast<T*>(dv), static_cast<const T*>(dout), lse, delta,
            static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), n, mask, scale);
        LOOM_CUDA_CHECK(cudaGetLastError());
      }
    });
  });
}

}  // namespace loom::cuda::detail
