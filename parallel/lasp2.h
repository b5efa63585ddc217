// LASP-2 (ALGORITHMS.md §5): sequence parallelism for lightning attention
// (L layers). Each rank holds its tokens as one or two units (chunks of the
// TokenLayout: contiguous has one per rank, zigzag two). Forward computes each
// unit's memory state M_u = Σ_j γ^(L_u-1-j) k_jᵀ v_j, all-gathers them in ONE
// collective (size B·H·D·D per unit, independent of T), runs the prefix scan
// over all units in sequence order P_{u+1} = γ^(L_u)·P_u + M_u and then the
// lightning kernel on each local unit from its initial state P_u. Backward
// computes dP_u = s_o·Σ_i γ^(i+1) q_iᵀ do_i, all-gathers them in ONE
// collective, runs the suffix scan G_u = γ^(L_{u+1})·G_{u+1} + dP_{u+1} and the
// lightning backward of each local unit with dS_final = G_u. Only P_u and G_u
// of the local units are kept, never the gathered arrays.
//
// The result equals lightning_attention on the whole sequence (outputs and
// gradients of q, k, v) up to rounding. Runs on the data's device through
// kernels/dispatch.h: CPU f32|f64, CUDA f32|bf16 (a mesh's cp group sends CUDA
// tensors through NCCL). States travel in the state dtype (stats_dtype: fp32
// for 16-bit data, as §5 asks; f64 in gradient tests).
//
// Overlap (CUDA): the gathered states come from small GEMMs, so each
// all-gather is posted on a side stream right away and the lightning kernel's
// zero-state (forward) or G-free (backward) pass over the local units runs
// beside it; the inter-unit terms are GEMMs added after the scan.
#pragma once

#include "framework/autograd.h"
#include "parallel/communicator.h"
#include "parallel/token_layout.h"

namespace loom {

// q, k, v (B, T_local, H, D) on one device, f32|f64 (CPU) or f32|bf16 (CUDA):
// this rank's tokens in layout order (T_local = layout.local_len()); decay_lambdas (H) >= 0 (not differentiated).
// `cp` is the layout's group (size layout.cp_size(), this rank = cp.rank());
// it must outlive the backward pass. Returns out (B, T_local, H, D) as one
// autograd node with gradients to q, k, v.
Variable lasp2_attention(const Variable& q, const Variable& k, const Variable& v, const Tensor& decay_lambdas,
                         double out_scale, int64_t block_size, const TokenLayout& layout, Communicator& cp);

// The units of a layout in sequence order: unit i is chunk `chunk` (local
// index) of rank `rank`. Exposed for tests.
struct LaspUnit {
  int rank = 0;
  int chunk = 0;
  TokenChunk tokens;
};
std::vector<LaspUnit> lasp2_units(const TokenLayout& layout);

}  // namespace loom
