// Which 64-key tiles each dK dV block of the flash backward takes, the launch
// order of those blocks, the tile order of its fp32 dQ, and the divisions of the
// masks' position arithmetic: plain integer arithmetic, compiled for the host
// too, so that the CPU tests check it (tests/cuda/flash_attention_test.cpp).
#pragma once

#include <cstdint>

#include "framework/host_device.h"

namespace loom::cuda::detail {

// a / b and a % b as C++ computes them, in 32 bits where a and b are both in [0, 2^32) (every
// real position and block id): a 64-bit division is a long subroutine on the GPU, and the tile
// plans of S2 blocks run several per tile of the sequence.
LOOM_HOST_DEVICE inline bool fits_u32(int64_t a, int64_t b) {
  return ((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32) == 0;
}
LOOM_HOST_DEVICE inline int64_t div_pos(int64_t a, int64_t b) {
  return fits_u32(a, b) ? int64_t{static_cast<uint32_t>(a) / static_cast<uint32_t>(b)} : a / b;
}
LOOM_HOST_DEVICE inline int64_t mod_pos(int64_t a, int64_t b) {
  return fits_u32(a, b) ? int64_t{static_cast<uint32_t>(a) % static_cast<uint32_t>(b)} : a % b;
}

}  // namespace loom::cuda::detail

namespace loom::cuda::detail::flash {

constexpr int kTile = 64;  // rows of a streamed tile; granularity of the position bounds

// A block's (row block, head).
struct BlockSlot {
  int64_t block, head;
};

// The tile index within a chunk of 2 pair tiles that is on the strided shard of kv head hk under
// S2 with 64-key blocks and vert_stride = pair (offset: the mask's s2_offset): the chunk's tiles
// s and s + pair, with (s + hk offset) % pair == 0.
LOOM_HOST_DEVICE inline int64_t s2_strided_index(int64_t hk, int64_t offset, int64_t pair) {
  return ((-(hk * offset)) % pair + pair) % pair;
}

// The 64-key tiles of dK dV block kb of `keys` keys (64 or 128) over S keys: half h is tile
// t0 + h step. Contiguous (step 1) unless pair > 1 and keys 128: then the full tiles come in
// chunks of 2 pair, block i of a chunk taking tiles i and i + pair, so that under S2 with 64-key
// blocks and pair = vert_stride both halves are on the same strided shard or both off it (the
// same work); the tiles after the last whole chunk (a partial last tile among them) are paired
// in order. With `strided` (s2_strided_index of the block's kv head; -1: none), only block
// `strided` of a chunk takes its two strided tiles that way: the others pair the chunk's 2 pair
// - 2 local tiles in ascending order (steps 1 to 3), so a block's two local windows overlap
// (16 + step query tiles instead of 16 + pair, most of them met by one half only). The blocks
// number ceil(tiles / 2) either way.
struct KeyTiles {
  int64_t t0, step;
};
LOOM_HOST_DEVICE inline KeyTiles key_tiles_of(int64_t kb, int keys, int64_t S, int64_t pair, int64_t strided = -1) {
  if (keys == 2 * kTile && pair > 1) {  // 32-bit arithmetic: blocks and tiles are < 2^17 (flash_grid)
    const uint32_t b = static_cast<uint32_t>(kb), p = static_cast<uint32_t>(pair);
    const uint32_t chunk = 2 * p, whole = static_cast<uint32_t>(S / kTile) / chunk;
    if (b >= whole * p) return {int64_t{whole * chunk + 2 * (b - whole * p)}, 1};
    const uint32_t c = b / p, i = b % p;
    if (strided < 0 || i == static_cast<uint32_t>(strided)) return {int64_t{chunk * c + i}, int64_t{p}};
    // Local pair j of the chunk: its local tiles k = 2 j and 2 j + 1 of 2 p - 2, ascending (the
    // first p - 1 in the chunk's first half, the rest in its second; each half skips its strided tile).
    const uint32_t s = static_cast<uint32_t>(strided), j = i < s ? i : i - 1;
    auto local = [&](uint32_t k) {
      const uint32_t half = k < p - 1 ? 0 : 1, r = k - half * (p - 1);
      return half * p + (r < s ? r : r + 1);
    };
    const uint32_t first = local(2 * j), second = local(2 * j + 1);
    return {int64_t{chunk * c + first}, int64_t{second - first}};
  }
  return {kb * (keys / kTile), 1};
}

// Chunks of one head that s2_block_order launches together.
constexpr int64_t kS2Group = 8;

// The launch order of paired S2 dK dV blocks (key_tiles_of's blocks with keys 128 and pair > 1,
// `blocks` per kv head, `heads` kv heads): slot `lin` of the launch (blockIdx.y * heads +
// blockIdx.x) runs block `block` of head `head`. First each head's strided pairs (the long
// columns under causal, taking S2 block J as key tile J; offset: the mask's s2_offset), in
// groups of kS2Group chunks of one head, low chunks first, so that a group starts and walks its
// query tiles together (their Q, dO and dQ rows shared in L2); then the local pairs, then the
// unpaired tail. A permutation of (block, head): only the speed depends on it.
LOOM_HOST_DEVICE inline BlockSlot s2_block_order(int64_t lin, int64_t blocks, int64_t heads, int64_t S, int64_t pair,
                                                 int64_t offset) {
  const int64_t p = pair, whole = S / kTile / (2 * p);
  const int64_t long_total = heads * whole;
  auto strided_index = [&](int64_t h) { return s2_strided_index(h, offset, p); };
  if (lin < long_total) {
    const int64_t cg = lin / (heads * kS2Group), r = lin - cg * heads * kS2Group;
    const int64_t size = whole - cg * kS2Group < kS2Group ? whole - cg * kS2Group : kS2Group;
    const int64_t h = r / size, c = cg * kS2Group + r % size;
    return {c * p + strided_index(h), h};
  }
  const int64_t local_per_head = whole * (p - 1);
  int64_t r = lin - long_total;
  if (r < heads * local_per_head) {
    const int64_t h = r / local_per_head, q = r % local_per_head, c = q / (p - 1), j = q % (p - 1);
    const int64_t si = strided_index(h);
    return {c * p + (j < si ? j : j + 1), h};
  }
  r -= heads * local_per_head;
  const int64_t tail = blocks - whole * p;
  return {whole * p + r % tail, r / tail};
}

// dQ in tile order, the warpgroup dK dV kernel's fp32 dq_acc (flash_dq_acc_elems floats): chunk
// (b, query tile t, head h) of kTile x D floats at ((b * tiles + t) * H + h) kTile D, as D / 64
// tiles of 64 x 64. In a tile, warp w's accumulator fragment of columns 8 nt .. 8 nt + 7 (m16n8:
// lane = 4 g + t4 holds rows 16 w + g, + 8 by columns 8 nt + 2 t4, + 1) sits at
// dq_tile_index(w, nt, lane) as 4 floats (row g: 2, then row g + 8: 2), so each thread stores its
// fragments as 16-byte vectors and a warp's stores are contiguous. Rows past T are padding.
constexpr int kDqTileElems = kTile * 64;
LOOM_HOST_DEVICE constexpr int dq_tile_index(int w, int nt, int lane) { return 4 * (32 * (8 * w + nt) + lane); }
// The (row, column) within its 64 x 64 tile of float i of a tile in that order.
struct TileCell {
  int row, col;
};
LOOM_HOST_DEVICE constexpr TileCell dq_tile_cell(int i) {
  const int q = i / 4, j = i % 4, lane = q % 32, nt = q / 32 % 8, w = q / 256;
  return {16 * w + lane / 4 + 8 * (j / 2), 8 * nt + 2 * (lane % 4) + j % 2};
}

}  // namespace loom::cuda::detail::flash
