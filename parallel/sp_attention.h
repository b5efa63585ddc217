// Pieces shared by the two sequence-parallel softmax attentions
// (parallel/ring_attention.h, parallel/allgather_attention.h):
//  - the traffic and work counters a caller aggregates into its metrics;
//  - input checks against the token layout and the cp group;
//  - the block planner: which (query range, key range) pairs of a local Q
//    against one received K,V block are worth computing, from the tokens'
//    global positions (causal: key ranges wholly in the future are skipped;
//    S2: key blocks that no local query of any head needs are skipped);
//  - forward over such a plan with the exact log-sum-exp merge of
//    ALGORITHMS.md §1, and backward over it from the final (out, lse);
//  - PackedMessage: several typed arrays in one byte buffer, so K, V, their
//    positions and gradient accumulators travel in a single transfer.
// Everything here is local computation; the communication schedule lives in
// the two callers.
#pragma once

#include <cstdint>
#include <vector>

#include "framework/ops_nn.h"
#include "framework/stream.h"
#include "framework/tensor.h"
#include "parallel/communicator.h"
#include "parallel/token_layout.h"

namespace loom {

// Counters a call adds to: the forward's when the op runs, the backward's when
// its gradient runs (so the object must outlive the backward; pass nullptr to
// count nothing). Bytes are what this rank sends; a collective counts as a ring
// implementation sends it ((P - 1) of the P blocks of an all-gather or a
// reduce-scatter). Work is in (query token, key token) pairs of the launched
// attention blocks, per batch row and query head, masked pairs inside a block included.
struct SpAttentionStats {
  int64_t forward_bytes_sent = 0;
  int64_t backward_bytes_sent = 0;
  int64_t forward_messages = 0;   // transfers (ring hops or collectives) this rank started
  int64_t backward_messages = 0;
  int64_t forward_blocks = 0;     // attention kernel calls
  int64_t backward_blocks = 0;
  int64_t forward_score_pairs = 0;
  int64_t backward_score_pairs = 0;
  int64_t bytes_sent() const { return forward_bytes_sent + backward_bytes_sent; }
};

// A range [start, start + len) of key rows of a key/value block, in buffer order.
struct KeyRange {
  int64_t start = 0, len = 0;
  bool operator==(const KeyRange&) const = default;
};
// Rows [q_start, q_start + q_len) of the local queries against the key rows
// of `keys` (ascending, disjoint; several under S2 or when the keys in between
// are not needed): one attention kernel call, the keys gathered when there
// are several ranges.
struct AttentionBlock {
  int64_t q_start = 0, q_len = 0;
  std::vector<KeyRange> keys;
  int64_t k_len() const;  // keys attended, over all ranges
  bool operator==(const AttentionBlock&) const = default;
};

// The blocks worth computing for queries at q_positions (Tq) against keys at
// k_positions (Tk), both i64 global positions. Each buffer is cut into runs of
// consecutive positions, also at multiples of `chunk` (> 0: the layout's chunk
// length, so a zigzag shard is two runs even where its chunks touch, as on
// rank P - 1) and, under S2, at S2 block boundaries; a (query run, key run) pair is kept when some of its
// (query, key) pairs is visible for some of the `num_patterns` patterns
// (causal: key position <= query position; S2: the block pair is active).
// Adjacent kept key runs merge into one range, and adjacent query runs with
// the same key ranges into one block. Without causal or S2 the plan is one
// block of everything. Every visible pair lies in exactly one block, so
// attending only the plan is exact; under S2 this is the block sparsity
// itself (a query block meets only the key blocks it needs).
std::vector<AttentionBlock> plan_attention_blocks(const Tensor& q_positions, const Tensor& k_positions, bool causal,
                                                  const S2Pattern& s2, int64_t num_patterns, int64_t chunk = 0);

namespace sp {

// A sequence-parallel attention call, checked and resolved.
struct AttentionCall {
  int64_t B = 0, T = 0, H = 0, Hkv = 0, D = 0;  // T: local tokens (layout.local_len())
  double scale = 0.0;
  bool causal = true;
  S2Pattern s2;
  int64_t chunk = 0;   // the layout's chunk length (block planning cuts there)
  Tensor q_positions;  // (T) i64 owned: options.q_positions, else layout.positions(rank)
  Tensor k_positions;  // (T) i64 owned: options.k_positions, else the query positions
};
// Checks q (B, T, H, D), k and v (B, T, Hkv, D) (CPU, f32 or f64, one dtype),
// T == layout.local_len(), layout.cp_size() == cp.size(), positions and S2
// options as the attention op checks them; errors name `op` and the values.
AttentionCall resolve_call(const char* op, const Variable& q, const Variable& k, const Variable& v,
                           const AttentionOptions& options, const TokenLayout& layout, const Communicator& cp);

// Forward of one key/value block: every block of `plan` is attended and merged
// into (out_acc (B, T, H, D), lse_acc (B, H, T)) by ALGORITHMS.md §1 (start with
// zeros and -inf). q (B, T, H, D), k, v (B, S, Hkv, D) contiguous; positions (T), (S).
void attend_forward(Tensor& out_acc, Tensor& lse_acc, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& q_positions, const Tensor& k_positions, const std::vector<AttentionBlock>& plan,
                    const AttentionCall& call, SpAttentionStats* stats, Stream& stream);

// Backward of one key/value block from the FINAL out (B, T, H, D) and lse
// (B, H, T) of the merged forward: adds this block's terms to dq (B, T, H, D),
// dk, dv (B, S, Hkv, D). dout (B, T, H, D) and dlse (B, H, T) may be undefined (zero).
void attend_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                     const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                     const Tensor& q_positions, const Tensor& k_positions, const std::vector<AttentionBlock>& plan,
                     const AttentionCall& call, SpAttentionStats* stats, Stream& stream);

// Typed arrays back to back in one u8 buffer, each at an 8-byte aligned offset.
class PackedMessage {
 public:
  int add(const Shape& shape, DType dtype);  // -> part index
  int64_t nbytes() const { return nbytes_; }  // a multiple of 8
  Tensor allocate() const;                     // (nbytes) u8
  // A contiguous typed view of part `part` of the message starting at byte
  // `base` of `buffer` (u8, contiguous).
  Tensor view(const Tensor& buffer, int part, int64_t base = 0) const;

 private:
  struct Part {
    Shape shape;
    DType dtype;
    int64_t offset;
  };
  std::vector<Part> parts_;
  int64_t nbytes_ = 0;
};

// dst (B, N, ...) rows [start, start + n) += src (B, n, ...); both contiguous, same dtype.
void add_rows(Tensor& dst, const Tensor& src, int64_t start);

}  // namespace sp
}  // namespace loom
