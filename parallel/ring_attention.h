// Ring attention (ALGORITHMS.md §1, §2): exact softmax attention over a
// sequence split across the cp group, with each rank's K,V shard travelling
// the ring. One autograd node with two outputs (out, lse), like the attention
// op it equals.
//
// Forward, P steps: at step i a rank holds the K,V shard of rank r - i (mod P)
// (only the Hkv heads, packed with its global positions into one message),
// posts the hop that passes it on to r + 1 and receives the next from r - 1,
// attends its local Q against the held block, and merges the partial (out,
// lse) exactly (§1; empty rows keep lse = -inf, never NaN). Which parts of a
// block are computed follows the tokens' positions (plan_attention_blocks):
// under the zigzag layout the diagonal step runs two blocks (3/4 of a full
// block's pairs), and every later step exactly half a block — the whole local
// Q against the first chunk of a lower rank's shard, or only the second local
// chunk against all of a higher rank's shard — so all ranks do equal work;
// under the contiguous layout a shard wholly in the future is skipped. With
// S2, key blocks no local query needs in any head are skipped too (their
// bytes still travel: the ring passes every shard to every rank).
//
// Backward, from the final (out, lse) and both output gradients (dlse too:
// callers may differentiate through lse): the ring runs again; dQ accumulates
// locally; the dK, dV accumulator of each shard travels with the ring so it
// ends at the shard's home. Each hop is ONE message holding the K,V (and
// positions) being passed on and the accumulator finished at the previous
// step, i.e. an accumulator travels one hop behind its K,V: that lets a hop be
// posted before the step's compute (its contents are all ready), so on CUDA
// the transfer overlaps the compute in the backward as in the forward. It
// takes P + 1 hops (K,V on the first P - 1, accumulators on the last P - 1
// plus one that brings the last block's accumulator home); the bytes equal
// those of sending each shard's K,V with its accumulator.
//
// Overlap: every hop is "post (send to r + 1, receive from r - 1), compute on
// the held block, wait" (sp::RingHop). On MPI send_recv blocks, so post()
// completes the transfer at once. On CUDA (NCCL) post() queues the transfer on
// the communicator's stream after an event recorded on the compute stream,
// the step's attention then runs on the compute stream while the bytes move,
// and wait() makes the compute stream wait for the transfer's event; two
// message buffers alternate in the forward (the one attended is the one being
// sent on, the other receives). No host sync inside the ring; with
// SpAttentionStats::time_ring_hops the hops are timed with events, read once
// after the ring (a host sync, only then).
//
// Precision: the running (out, lse) and the dQ, dK, dV accumulators (also as
// they travel) are fp32 for bf16 data; out is rounded to bf16 once, after the
// last step, and the gradients once, at the end. lse is returned in fp32 for
// bf16 data, as the attention op returns it.
#pragma once

#include "framework/ops_nn.h"
#include "parallel/communicator.h"
#include "parallel/sp_attention.h"
#include "parallel/token_layout.h"

namespace loom {

// q (B, T, H, D), k and v (B, T, Hkv, D): this rank's shards in layout order
// (T = layout.local_len(), H % Hkv == 0). options as for attention():
// q_positions / k_positions are the local tokens' global positions, host
// tensors (default: layout.positions(rank), and k_positions = q_positions);
// causal, scale, s2. q, k, v on one device: CPU (f32, f64; `cp` an MPI group)
// or CUDA (bf16, f32, D <= 128; `cp` a CUDA mesh group or an NcclCommunicator;
// given positions are all-gathered once on the host first, through MPI for a
// mesh group, or on the device plus one host read for a bare NCCL group).
// Returns out (B, T, H, D) and lse (B, H, T) equal to the rows of this rank in
// attention() over the whole sequence; both are differentiable. Collective
// over `cp` (forward and backward): every rank calls it with the same shapes;
// the backward uses `cp` again, so it must outlive the backward. `stats` (may
// be null) gets this rank's traffic and work added, the backward's when the
// gradient runs, so it too must outlive the backward.
AttentionResult ring_attention(const Variable& q, const Variable& k, const Variable& v,
                               const AttentionOptions& options, const TokenLayout& layout, Communicator& cp,
                               SpAttentionStats* stats = nullptr);

// Bytes one rank sends in one ring_attention call, forward and backward, for
// shards (B, T, Hkv, D) of a `dtype` over P ranks (what the stats will count;
// the backward's accumulators travel in fp32 for 16-bit dtypes).
int64_t ring_attention_forward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P);
int64_t ring_attention_backward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P);

}  // namespace loom
