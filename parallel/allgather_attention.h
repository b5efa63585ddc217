// LASP-2H all-gather attention for softmax layers (ALGORITHMS.md §6): one
// all-gather of every rank's K,V shard (only the Hkv heads, packed with the
// shard's global positions into one message) over the cp group, then the
// local Q attends to the gathered K,V with the causal (and S2) mask at the
// right global positions; the backward computes the gradients of the gathered
// K,V and returns each rank its part with one reduce-scatter (the conjugate of
// the all-gather). One autograd node, one collective each way.
//
// The gathered keys stay in rank order (not global order): the mask works on
// positions, so no reordering is needed, and the same block planner as ring
// attention skips key ranges that are wholly in the future (or that no local
// head needs under S2). Against the ring: fewer, larger messages and no
// per-step latency, but the whole sequence's K,V is resident on every rank.
// On CUDA both collectives go through NCCL, ordered on the compute stream by
// events (no host sync); they are not overlapped with compute (the forward's
// gather could overlap the Q projection, which runs before this call).
#pragma once

#include "framework/ops_nn.h"
#include "parallel/communicator.h"
#include "parallel/sp_attention.h"
#include "parallel/token_layout.h"

namespace loom {

// Same contract as ring_attention (parallel/ring_attention.h): q (B, T, H, D),
// k and v (B, T, Hkv, D) local shards in layout order; returns this rank's
// rows of attention() over the whole sequence, out (B, T, H, D) and lse
// (B, H, T), both differentiable. Collective over `cp`, forward and backward;
// `cp` and `stats` (may be null) must outlive the backward.
AttentionResult allgather_attention(const Variable& q, const Variable& k, const Variable& v,
                                    const AttentionOptions& options, const TokenLayout& layout, Communicator& cp,
                                    SpAttentionStats* stats = nullptr);

// Bytes one rank sends per call (a ring all-gather / reduce-scatter sends
// P - 1 of the P blocks), for shards (B, T, Hkv, D) of `dtype` over P ranks
// (the backward's reduce-scatter runs in fp32 for 16-bit dtypes).
int64_t allgather_attention_forward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P);
int64_t allgather_attention_backward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P);

}  // namespace loom
