// The pass description shared by the two lightning chunk kernels (CUDA cores
// for f32 storage in lightning.cu, tensor cores for bf16 in lightning_mma.cuh).
// A pass walks the 64-token chunks of one segment of one (batch, head) in order
// (or in reverse) and keeps a D x D state St (the f32 kernel: a (D, 32) column
// tile of it per block):
//   A[i][j] = intra * p[|i-j|] (x_i . y_j) on the causal side
//   out_i   = sum_j A[i][j] z_j + w_inter[i] * x_i St
//   St      = p[n] St + sum_j w_update[j] y_j^T z_j
// (lightning.cu names the passes). The sequence is split into `segments` of
// seg_len tokens (blockIdx.z = b * segments + segment); a state-only pass
// computes each segment's local state from zero, a scan turns those into
// each segment's entering state, and the output pass starts from it.
#pragma once

#include <cstdint>

namespace loom::cuda::lightning_detail {

constexpr int kThreads = 256;  // the f32 kernel's block (the bf16 kernel's: D / 16 warps)
constexpr int kChunk = 64;     // tokens per chunk
constexpr int kCols = 32;      // state columns per block of the f32 kernel
constexpr int kMaxHeadDim = 128;

struct Pass {
  void* out;                 // (B, T, H, D); unused by a state-only pass
  const void* x;             // (B, T, H, D); x, y, z null = zeros
  const void* y;
  const void* z;
  const float* state_in;     // (segments or 1, B, H, D, D) or null (zeros)
  int64_t state_in_stride;   // elements between segments' states (0: one state for all)
  bool transpose_in;         // tile column c, row r <- state_in[c][r]
  float* state_out;          // (segments, B, H, D, D) or null
  bool reverse;
  bool state_only;           // only the state update (no A, no out)
  float intra, inter, update;
};

struct PassSet {
  Pass pass[3];
  int tiles;               // column tiles per pass (blockIdx.x = pass * tiles + tile; 1 for bf16)
  const float* powers;     // (H, kChunk + 1): gamma_h^m
  int64_t B, T, H, D;
  int64_t seg_len;         // tokens per segment, a multiple of kChunk
  int segments;
};

}  // namespace loom::cuda::lightning_detail
