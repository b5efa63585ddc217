// Pieces shared by the two sequence-parallel softmax attentions
// (parallel/ring_attention.h, parallel/allgather_attention.h):
//  - the traffic and work counters a caller aggregates into its metrics, and
//    (CUDA) the ring's per-hop compute / transfer / exposed-wait timings;
//  - input checks against the token layout and the cp group;
//  - the block planner: which (query range, key range) pairs of a local Q
//    against one received K,V block are worth computing, from the tokens'
//    global positions (causal: key ranges wholly in the future are skipped;
//    S2: key blocks that no local query of any head needs are skipped);
//  - forward over such a plan with the exact log-sum-exp merge of
//    ALGORITHMS.md §1 (kernels/cpu|cuda/attention_merge, fp32 on CUDA), and
//    backward over it from the final (out, lse);
//  - PackedMessage: several typed arrays in one byte buffer, so K, V, their
//    positions and gradient accumulators travel in a single transfer;
//  - RingHop: one ring transfer, posted before the step's compute and waited
//    for after it (on CUDA: on the communicator's stream, event-ordered).
// Both run on CPU tensors (MPI) and CUDA tensors (NCCL); the kernels are
// reached through kernels/dispatch.h.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "framework/ops_nn.h"
#include "framework/stream.h"
#include "framework/tensor.h"
#include "kernels/cpu/attention.h"
#include "parallel/communicator.h"
#include "parallel/token_layout.h"

namespace loom {

// Where the time of the ring's hops went on CUDA, summed over hops. A hop's
// step is "post the transfer, run the step's attention, wait": compute_ms is
// the compute stream's work between post and wait, transfer_ms the transfer
// from the moment the compute stream released it until it landed, and
// exposed_ms the part of the transfer the compute stream had to wait for
// after its own work (max(0, transfer end - compute end)); exposed_ms ≈ 0
// means the transfers were hidden behind compute. step_ms is the wall time
// from the hop's start until both it and the step's compute were done: about
// max(compute, transfer) when they overlap, their sum when they serialize
// (in either order). Steps without a transfer (a ring's last forward step)
// are not counted.
struct RingHopTimes {
  int64_t hops = 0;
  double compute_ms = 0.0, transfer_ms = 0.0, exposed_ms = 0.0, step_ms = 0.0;
};

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

  // Set before the call to time ring hops with CUDA events (CUDA tensors
  // only; ignored on CPU). Reading the events waits for the device once,
  // after the ring's last hop was posted, so leave it off in training runs.
  bool time_ring_hops = false;
  RingHopTimes forward_hops, backward_hops;
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
  // The block's mask as its positions give it (cpu::mask_form; positions under S2).
  cpu::MaskForm form;
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
  Device device;       // where q, k, v live (the computation runs there)
  DType dtype = DType::f32;      // q, k, v (what travels)
  DType acc_dtype = DType::f32;  // lse, the merge and gradient accumulators: f32 for 16-bit data, else dtype
  Tensor q_positions;  // (T) i64 on the host: options.q_positions, else layout.positions(rank)
  Tensor k_positions;  // (T) i64 on the host: options.k_positions, else the query positions
  Tensor q_positions_device;  // (T) i64 on `device` (the kernels' copy; the host tensor on CPU)
  // CUDA only: every cp rank's k_positions on the host, in rank order (the
  // block planner needs a shard's positions before its bytes arrive on the
  // device). Empty on CPU, where the received positions are read directly.
  std::vector<Tensor> rank_k_positions;
};
// Checks q (B, T, H, D), k and v (B, T, Hkv, D) (one device and dtype: f32 or
// f64 on CPU, f32 or bf16 on CUDA), T == layout.local_len(),
// layout.cp_size() == cp.size(), positions (host tensors) and S2 options as
// the attention op checks them; errors name `op` and the values. On CUDA it
// also fills rank_k_positions: from the layout when no positions are given,
// else with one all-gather of the host positions over `cp` (collective then).
AttentionCall resolve_call(const char* op, const Variable& q, const Variable& k, const Variable& v,
                           const AttentionOptions& options, const TokenLayout& layout, Communicator& cp);

// Forward of one key/value block: every block of `plan` is attended and merged
// into (out_acc (B, T, H, D), lse_acc (B, H, T), both call.acc_dtype) by
// ALGORITHMS.md §1 (start with zeros and -inf). q (B, T, H, D), k, v
// (B, S, Hkv, D) contiguous in call.dtype; positions (T), (S) i64 on the
// data's device (the kernels read them; `plan` was made from host copies).
void attend_forward(Tensor& out_acc, Tensor& lse_acc, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& q_positions, const Tensor& k_positions, const std::vector<AttentionBlock>& plan,
                    const AttentionCall& call, SpAttentionStats* stats, Stream& stream);

// Backward of one key/value block from the FINAL out (B, T, H, D, call.dtype)
// and lse (B, H, T, call.acc_dtype) of the merged forward: adds this block's
// terms to the accumulators dq (B, T, H, D), dk, dv (B, S, Hkv, D), all
// call.acc_dtype. dout (B, T, H, D, call.dtype) and dlse (B, H, T,
// call.acc_dtype) may be undefined (zero).
void attend_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                     const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                     const Tensor& q_positions, const Tensor& k_positions, const std::vector<AttentionBlock>& plan,
                     const AttentionCall& call, SpAttentionStats* stats, Stream& stream);

// Typed arrays back to back in one u8 buffer, each at an 8-byte aligned offset.
class PackedMessage {
 public:
  int add(const Shape& shape, DType dtype);  // -> part index
  int64_t nbytes() const { return nbytes_; }  // a multiple of 8
  Tensor allocate(Device device = Device::cpu()) const;  // (nbytes) u8
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

// dst (B, N, ...) rows [start, start + n) += src (B, n, ...) (src any strides;
// on CUDA src may be 16-bit with an fp32 dst), through dispatch::axpy.
void add_rows(Tensor& dst, const Tensor& src, int64_t start);

// One hop of a ring over `cp`: send a buffer to rank + 1 and receive one from
// rank - 1, posted before the step's compute and waited for after it.
//   CPU (MPI): post() completes the transfer (send_recv blocks), wait() is a no-op.
//   CUDA: post() queues the send_recv after the compute stream's work so far
//   (an event) without making the compute stream wait for it: the transfer
//   is issued from a stream of the hop's own, so the communicator's
//   "caller waits for the collective" ordering lands there, and the compute
//   stream runs on; wait() makes the compute stream wait for the transfer
//   (an event, no host sync). The buffers are held until wait(), so their
//   stream-ordered frees come after the transfer.
// One RingHop serves all hops of a ring (one in flight at a time); if
// `timed`, each hop's events are kept for add_times().
class RingHop {
 public:
  RingHop(Communicator& cp, Stream& compute, bool timed = false);
  ~RingHop();  // waits for a hop still in flight (its buffers must outlive it)
  RingHop(const RingHop&) = delete;
  RingHop& operator=(const RingHop&) = delete;

  void post(const Tensor& send, Tensor& recv);
  void wait();
  // Adds the hops' timings so far to `times` (CUDA and timed only; waits on
  // the host for the events, i.e. for the device to finish those hops).
  void add_times(RingHopTimes& times);

 private:
  struct HopEvents;
  Communicator& cp_;
  Stream& compute_;
  bool timed_;
  std::unique_ptr<Stream> hop_stream_;          // CUDA: issues the transfers
  std::unique_ptr<Event> ready_, done_;         // compute -> hop stream, hop stream -> compute
  std::vector<std::unique_ptr<HopEvents>> hop_events_;  // timed: one per hop
  Tensor send_, recv_;                          // held while a hop is in flight
  bool pending_ = false;
};

}  // namespace sp
}  // namespace loom
