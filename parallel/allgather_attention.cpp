// LASP-2H all-gather attention (see allgather_attention.h): gather, attend
// with the shared block planner and merge, and in backward reduce-scatter the
// gathered K,V gradients home. Runs on CPU tensors (MPI) and CUDA tensors
// (NCCL; each collective is ordered on the compute stream by the
// communicator's events). The merge and the gradient accumulators are
// call.acc_dtype (fp32 for bf16 data), and so is the reduce-scatter of the
// dK, dV terms; out and the gradients are cast to the data's dtype once.
#include "parallel/allgather_attention.h"

#include <limits>

#include "framework/op_checks.h"

namespace loom {

namespace {

using sp::PackedMessage;

// One rank's contribution to the all-gather: its shard's positions, K and V.
struct ShardMessage {
  PackedMessage message;
  int positions, k, v;
  ShardMessage(const Shape& kv_shape, DType dtype)  // K, V in the data's dtype
      : positions(message.add({kv_shape[1]}, DType::i64)),  // (T) global positions
        k(message.add(kv_shape, dtype)),                     // (B, T, Hkv, D)
        v(message.add(kv_shape, dtype)) {}
};

void count(SpAttentionStats* stats, bool forward, int64_t bytes) {
  if (stats == nullptr) return;
  (forward ? stats->forward_bytes_sent : stats->backward_bytes_sent) += bytes;
  (forward ? stats->forward_messages : stats->backward_messages) += 1;
}

}  // namespace

AttentionResult allgather_attention(const Variable& q, const Variable& k, const Variable& v,
                                    const AttentionOptions& options, const TokenLayout& layout, Communicator& cp,
                                    SpAttentionStats* stats) {
  const sp::AttentionCall call = sp::resolve_call("allgather_attention", q, k, v, options, layout, cp);
  Tensor qc = q.data().contiguous();  // (B, T, H, D)
  const Device device = qc.device();
  Stream& stream = stream_for(qc);
  const int P = cp.size();
  const int64_t T = call.T, S = P * call.T;  // local and gathered tokens
  const Shape kv_shape{call.B, T, call.Hkv, call.D};
  const ShardMessage shard(kv_shape, call.dtype);
  const PackedMessage& m = shard.message;

  Tensor mine = m.allocate(device);
  m.view(mine, shard.positions).copy_(call.k_positions);
  m.view(mine, shard.k).copy_(k.data());
  m.view(mine, shard.v).copy_(v.data());
  Tensor everyone = Tensor::empty({P * m.nbytes()}, DType::u8, device);  // rank r's message at byte r * nbytes
  cp.all_gather(everyone, mine, stream);
  count(stats, true, (P - 1) * m.nbytes());

  // Gathered shards in rank order: the mask works on positions, not on order.
  Tensor k_all = Tensor::empty({call.B, S, call.Hkv, call.D}, call.dtype, device);  // (B, S, Hkv, D)
  Tensor v_all = Tensor::empty({call.B, S, call.Hkv, call.D}, call.dtype, device);
  Tensor positions_all = Tensor::empty({S}, DType::i64, device);                     // (S) for the kernels
  for (int r = 0; r < P; ++r) {
    const int64_t base = r * m.nbytes();
    positions_all.narrow(0, r * T, T).copy_(m.view(everyone, shard.positions, base));
    k_all.narrow(1, r * T, T).copy_(m.view(everyone, shard.k, base));
    v_all.narrow(1, r * T, T).copy_(m.view(everyone, shard.v, base));
  }
  // The planner reads host positions: the gathered ones on CPU, the copies
  // resolve_call gathered on the host on CUDA (no read-back of the device).
  Tensor plan_positions = positions_all;  // (S) i64 on the host
  if (device.is_cuda()) {
    plan_positions = Tensor::empty({S}, DType::i64);
    for (int r = 0; r < P; ++r) plan_positions.narrow(0, r * T, T).copy_(call.rank_k_positions[r]);
  }
  const std::vector<AttentionBlock> plan =
      plan_attention_blocks(call.q_positions, plan_positions, call.causal, call.s2, call.Hkv, call.chunk);
  Tensor out_acc = Tensor::zeros(qc.shape(), call.acc_dtype, device);  // (B, T, H, D)
  Tensor lse = Tensor::full({call.B, call.H, T}, -std::numeric_limits<double>::infinity(), call.acc_dtype,
                            device);  // (B, H, T)
  sp::attend_forward(out_acc, lse, qc, k_all, v_all, call.q_positions_device, positions_all, plan, call, stats,
                     stream);
  Tensor out = out_acc.to(call.dtype);  // (B, T, H, D): the one rounding of a 16-bit result

  // Collective over cp: runs even when both output gradients are absent here.
  auto backward = [qc, k_all, v_all, positions_all, out, lse, plan, call, &cp, stats](
                      const std::vector<Tensor>& grads) {
    Stream& stream = stream_for(qc);
    const Device device = qc.device();
    const int P = cp.size();
    const int64_t T = call.T, n = call.B * T * call.Hkv * call.D;  // elements of one shard's dk
    // (B, T, H, D) and (B, H, T), or none
    Tensor dout = grads[0].defined() ? grads[0].to(call.dtype).contiguous() : Tensor();
    Tensor dlse = grads[1].defined() ? grads[1].to(call.acc_dtype).contiguous() : Tensor();
    Tensor dq = Tensor::zeros(qc.shape(), call.acc_dtype, device);          // (B, T, H, D)
    Tensor dk_all = Tensor::zeros(k_all.shape(), call.acc_dtype, device);   // (B, S, Hkv, D)
    Tensor dv_all = Tensor::zeros(k_all.shape(), call.acc_dtype, device);
    sp::attend_backward(dq, dk_all, dv_all, dout, dlse, qc, k_all, v_all, out, lse, call.q_positions_device,
                        positions_all, plan, call, stats, stream);
    // Row r: rank r's shard's [dk, dv] terms from this rank; the sum over ranks comes home to r.
    Tensor by_rank = Tensor::empty({P, 2 * n}, call.acc_dtype, device);  // (P, 2 * B * T * Hkv * D)
    const Shape kv_shape{call.B, T, call.Hkv, call.D};
    for (int r = 0; r < P; ++r) {
      Tensor row = by_rank.select(0, r);
      row.narrow(0, 0, n).view(kv_shape).copy_(dk_all.narrow(1, r * T, T));
      row.narrow(0, n, n).view(kv_shape).copy_(dv_all.narrow(1, r * T, T));
    }
    Tensor mine = Tensor::empty({1, 2 * n}, call.acc_dtype, device);  // (1, 2 * B * T * Hkv * D)
    cp.reduce_scatter(mine, by_rank, ReduceOp::sum, stream);
    count(stats, false, (P - 1) * 2 * n * static_cast<int64_t>(dtype_size(call.acc_dtype)));
    Tensor flat = mine.select(0, 0);
    return std::vector<Tensor>{dq.to(call.dtype), flat.narrow(0, 0, n).view(kv_shape).to(call.dtype),
                               flat.narrow(0, n, n).view(kv_shape).to(call.dtype)};
  };
  std::vector<Variable> outputs = make_outputs({out, lse}, {q, k, v}, "AllGatherAttention", std::move(backward));
  return AttentionResult{outputs[0], outputs[1]};
}

int64_t allgather_attention_forward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P) {
  return (P - 1) * ShardMessage({B, T, Hkv, D}, dtype).message.nbytes();
}

int64_t allgather_attention_backward_bytes(int64_t B, int64_t T, int64_t Hkv, int64_t D, DType dtype, int P) {
  return (P - 1) * 2 * B * T * Hkv * D * static_cast<int64_t>(dtype_size(stats_dtype(dtype)));
}

}  // namespace loom
