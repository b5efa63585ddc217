// Dense softmax attention through cuDNN's fused flash-attention engine, built
// with cuDNN's backend graph API (an operation graph of matmul, pointwise and
// reduction nodes that cuDNN fuses into one kernel; no frontend library).
// Same contract as the flash kernels (attention.h) for what it takes: bf16
// q (B, T, H, D), k and v (B, S, Hkv, D) contiguous, D = 64 or 128, GQA,
// a diagonal mask: key j visible to query i iff j <= i + diagonal (0: causal
// with queries and keys from one start; S - T: the queries are the last T of
// the keys; >= S - 1: no mask), as cpu::mask_form finds it in the positions;
// out like q and lse (B, H, T) f32 (natural log-sum-exp of the scaled scores). The backward takes no gradient of lse and is not deterministic
// (cuDNN accumulates dQ with atomics). Plans are built once per shape and kept.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// What identifies an attention call's shape for a per-shape cache (cuDNN's
// plans here, the timed cuDNN/native choice in attention.cpp): device,
// direction, mask diagonal and the sizes of q (B, T, H, D) and k (B, S, Hkv, D).
struct AttentionShape {
  int device;
  bool backward;
  int64_t diagonal, B, T, S, H, Hkv, D;
  auto tie() const { return std::tie(device, backward, diagonal, B, T, S, H, Hkv, D); }
  bool operator<(const AttentionShape& o) const { return tie() < o.tie(); }
};
inline AttentionShape attention_shape(const Tensor& q, const Tensor& k, bool backward, int64_t diagonal) {
  return AttentionShape{q.device().index, backward, diagonal, q.size(0), q.size(1), k.size(1), q.size(2), k.size(2),
                        q.size(3)};
}

// True when loom was built with cuDNN and the library loads at version 9.x or later.
bool cudnn_attention_available();
// "9.14.0", or why cuDNN is not available ("built without cuDNN", ...).
std::string cudnn_attention_version();

// Whether a call of this shape may go to cuDNN (dtype, head dim, alignment;
// for the backward also the sequence lengths cuDNN's backward handles):
// nothing is built or run.
bool cudnn_attention_takes(const Tensor& q, const Tensor& k, const Tensor& v, bool backward);

// Run the call on cuDNN. Returns false, having written nothing, when cuDNN
// finds no engine for the graph (the reason is in cudnn_attention_last_error()
// and printed once on stderr; the shape is remembered and not tried again).
// Other cuDNN errors throw.
bool cudnn_attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             int64_t diagonal, double scale, Stream& s);
// dq, dk, dv (like q, k, v) from dout, out and lse of the forward.
bool cudnn_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                              const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                              int64_t diagonal, double scale, Stream& s);
// The reason the last shape without a plan was refused (empty when none was).
std::string cudnn_attention_last_error();

}  // namespace loom::cuda
