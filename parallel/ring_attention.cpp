// Ring attention's communication schedule (see ring_attention.h for the
// algorithm); the block planning, the exact merge, the per-block gradients and
// the hop itself (sp::RingHop: posted on the communicator's stream before the
// step's compute, event-ordered, on CUDA) are shared with the all-gather
// variant in parallel/sp_attention.cpp. The running (out, lse) and the dQ, dK,
// dV accumulators are call.acc_dtype (fp32 for bf16 data), and so are the
// accumulators that travel in the backward's messages; out is cast to the
// data's dtype once, after the last step, and the gradients once at the end.
#include "parallel/ring_attention.h"

#include <limits>
#include <optional>

#include "framework/op_checks.h"

namespace loom {

namespace {

using sp::PackedMessage;

// The parts of one hop's message: a K,V shard with its positions, the dK, dV
// accumulator of a shard, or both (then the accumulator belongs to the shard
// held one step earlier, see ring_attention.h).
struct HopMessage {
  PackedMessage message;
  int positions = -1, k = -1, v = -1, dk = -1, dv = -1;
  // K, V in the data's dtype; the accumulators in acc_dtype (fp32 for 16-bit data).
  HopMessage(bool with_kv, bool with_acc, const Shape& kv_shape, DType dtype, DType acc_dtype) {
    if (with_kv) {
      positions = message.add({kv_shape[1]}, DType::i64);  // (T) global positions of the shard
      k = message.add(kv_shape, dtype);                    // (B, T, Hkv, D)
      v = message.add(kv_shape, dtype);
    }
    if (with_acc) {
      dk = message.add(kv_shape, acc_dtype);  // (B, T, Hkv, D)
      dv = message.add(kv_shape, acc_dtype);
    }
  }
};

// A held K,V shard: views into a received message, or this rank's own tensors.
struct KvShard {
  Tensor positions;  // (T) i64 on the data's device (the kernels read it)
  Tensor k, v;       // (B, T, Hkv, D)
  int source = 0;    // the cp rank whose shard this is
};

// The blocks of the local queries against a held shard, planned from host
// positions: on CPU the received ones, on CUDA the copies gathered up front
// (the device bytes may still be in flight when the plan is made).
std::vector<AttentionBlock> plan_for(const sp::AttentionCall& call, const KvShard& held) {
  const Tensor& k_positions = call.rank_k_positions.empty() ? held.positions : call.rank_k_positions[held.source];
  return plan_attention_blocks(call.q_positions, k_positions, call.causal, call.s2, call.Hkv, call.chunk);
}

void count(SpAttentionStats* stats, bool forward, int64_t bytes) {
  if (stats == nullptr) return;
  (forward ? stats->forward_bytes_sent : stats->backward_bytes_sent) += bytes;
  (forward ? stats->forward_messages : stats->backward_messages) += 1;
}

Tensor lse_init(const Shape& shape, DType dtype, Device device) {
  return Tensor::full(shape, -std::numeric_limits<double>::infinity(), dtype, device);
}

// Backward of the whole ring (see ring_attention.h): returns {dq, dk, dv}
// in the data's dtype.
std::vector<Tensor> ring_backward(const Tensor& dout, const Tensor& dlse, const Tensor& q, const KvShard& own,
                                  const Tensor& out, const Tensor& lse, const sp::AttentionCall& call,
                                  Communicator& cp, SpAttentionStats* stats) {
  Stream& stream = stream_for(q);
  const int P = cp.size();
  const Shape kv_shape = own.k.shape();  // (B, T, Hkv, D)
  const Device device = q.device();
  Tensor dq = Tensor::zeros(q.shape(), call.acc_dtype, device);  // (B, T, H, D)
  sp::RingHop hop(cp, stream, stats != nullptr && stats->time_ring_hops);
  KvShard held = own;
  Tensor held_message;                // storage behind `held` once it was received
  Tensor acc_k, acc_v;                // accumulator of the shard held at the previous step
  for (int step = 0; step < P; ++step) {
    const bool send_kv = step + 1 < P, send_acc = step >= 1;
    std::optional<HopMessage> hop_layout;
    Tensor outgoing, incoming;  // alive until after hop.wait()
    if (send_kv || send_acc) {  // everything in this hop is ready: post it before the compute
      hop_layout.emplace(send_kv, send_acc, kv_shape, call.dtype, call.acc_dtype);
      const PackedMessage& m = hop_layout->message;
      outgoing = m.allocate(device);
      if (send_kv) {
        m.view(outgoing, hop_layout->positions).copy_(held.positions);
        m.view(outgoing, hop_layout->k).copy_(held.k);
        m.view(outgoing, hop_layout->v).copy_(held.v);
      }
      if (send_acc) {
        m.view(outgoing, hop_layout->dk).copy_(acc_k);
        m.view(outgoing, hop_layout->dv).copy_(acc_v);
      }
      incoming = m.allocate(device);
      hop.post(outgoing, incoming);
      count(stats, false, m.nbytes());
    }
    // This rank's terms of the held shard's gradients.
    Tensor dk = Tensor::zeros(kv_shape, call.acc_dtype, device);  // (B, T, Hkv, D)
    Tensor dv = Tensor::zeros(kv_shape, call.acc_dtype, device);
    sp::attend_backward(dq, dk, dv, dout, dlse, q, held.k, held.v, out, lse, call.q_positions_device, held.positions,
                        plan_for(call, held), call, stats, stream);
    hop.wait();
    if (send_acc) {  // the ranks before this one on the held shard's way round
      sp::add_rows(dk, hop_layout->message.view(incoming, hop_layout->dk), 0);
      sp::add_rows(dv, hop_layout->message.view(incoming, hop_layout->dv), 0);
    }
    acc_k = dk;
    acc_v = dv;
    if (send_kv) {
      const HopMessage& h = *hop_layout;
      held_message = incoming;
      held = {h.message.view(held_message, h.positions), h.message.view(held_message, h.k),
              h.message.view(held_message, h.v), (held.source + P - 1) % P};
    }
  }
  Tensor dk_home = acc_k, dv_home = acc_v;
  if (P > 1) {
    // The last shard held is rank r + 1's: its finished accumulator goes home,
    // and this rank's own arrives from r - 1. Nothing is left to overlap it with.
    HopMessage last(false, true, kv_shape, call.dtype, call.acc_dtype);
    Tensor outgoing = last.message.allocate(device), incoming = last.message.allocate(device);
    last.message.view(outgoing, last.dk).copy_(acc_k);
    last.message.view(outgoing, last.dv).copy_(acc_v);
    hop.post(outgoing, incoming);
    hop.wait();
    count(stats, false, last.message.nbytes());
    dk_home = last.message.view(incoming, last.dk);
    dv_home = last.message.view(incoming, last.dv);
  }
  if (stats != nullptr) hop.add_times(stats->backward_hops);
  return {dq.to(call.dtype), dk_home.to(call.dtype), dv_home.to(call.dtype)};
}

}  // namespace

AttentionResult ring_attention(const Variable& q, const Variable& k, const Variable& v,
                               const AttentionOptions& options, const TokenLayout& layout, Communicator& cp,
                               SpAttentionStats* stats) {
  const sp::AttentionCall call = sp::resolve_call("ring_attention", q, k, v, options, layout, cp);
  Tensor qc = q.data().contiguous();  // (B, T, H, D)
  const Device device = qc.device();
  const KvShard own{index_on(call.k_positions, device), k.data().contiguous(), v.data().contiguous(),
                    cp.rank()};  // (B, T, Hkv, D)
  Stream& stream = stream_for(qc);
  const int P = cp.size();
  const HopMessage hop_layout(true, false, own.k.shape(), call.dtype, call.acc_dtype);
  const PackedMessage& m = hop_layout.message;

  Tensor out_acc = Tensor::zeros(qc.shape(), call.acc_dtype, device);         // (B, T, H, D) running merge
  Tensor lse = lse_init({call.B, call.H, call.T}, call.acc_dtype, device);    // (B, H, T), -inf: no key yet
  // Two message buffers, used in turn: the one held (sent on while it is
  // attended) and the one being received; step 0 sends a packed copy of the
  // own shard from the second. On CUDA the receive into one overlaps the
  // attention reading the other; the hop's events keep them apart.
  Tensor buffers[2];
  if (P > 1) {
    buffers[0] = m.allocate(device);
    buffers[1] = m.allocate(device);
    m.view(buffers[1], hop_layout.positions).copy_(own.positions);
    m.view(buffers[1], hop_layout.k).copy_(own.k);
    m.view(buffers[1], hop_layout.v).copy_(own.v);
  }
  sp::RingHop hop(cp, stream, stats != nullptr && stats->time_ring_hops);
  KvShard held = own;
  for (int step = 0; step < P; ++step) {
    Tensor& outgoing = buffers[(step + 1) % 2];  // step 0: the packed own shard; later: the held one
    Tensor& incoming = buffers[step % 2];        // free: its contents were attended last step
    if (step + 1 < P) {  // post the hop that passes the held shard on, then compute on it
      hop.post(outgoing, incoming);
      count(stats, true, m.nbytes());
    }
    sp::attend_forward(out_acc, lse, qc, held.k, held.v, call.q_positions_device, held.positions, plan_for(call, held),
                       call, stats, stream);
    hop.wait();
    if (step + 1 < P) {
      held = {m.view(incoming, hop_layout.positions), m.view(incoming, hop_layout.k), m.view(incoming, hop_layout.v),
              (held.source + P - 1) % P};
    }
  }
  if (stats != nullptr) hop.add_times(stats->forward_hops);
  Tensor out = out_acc.to(call.dtype);  // (B, T, H, D): the one rounding of a 16-bit result

  // Gradients to q, k, v: collective over cp, so it runs even when both
  // output gradients are absent on this rank (they count as zero).
  auto backward = [qc, own, out, lse, call, &cp, stats](const std::vector<Tensor>& grads) {
    // (B, T, H, D) and (B, H, T), or none
    Tensor dout = grads[0].defined() ? grads[0].to(call.dtype).contiguous() : Tensor();
    Tensor dlse = grads[1].defined() ? grads[1].to(call.acc_dtype).contiguous() : Tensor();
    return ring_backward(dout, dlse, qc, own, out, lse, call, cp, stats);
  };
  std::vector<Variable> outputs = make_outputs({out, lse}, {q, k, v}, "RingAttention", std::move(backward));
  return AttentionResult{outputs[0], outputs[1]};
}

int64_t ring_attention_forward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P) {
  return (P - 1) * HopMessage(true, false, {B, T, Hkv, D}, dtype, stats_dtype(dtype)).message.nbytes();
}

int64_t ring_attention_backward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P) {
  if (P <= 1) return 0;
  const Shape shape{B, T, Hkv, D};
  const int64_t kv = HopMessage(true, false, shape, dtype, stats_dtype(dtype)).message.nbytes();
  const int64_t acc = HopMessage(false, true, shape, dtype, stats_dtype(dtype)).message.nbytes();
  return (P - 1) * kv + P * acc;
}

}  // namespace loom
