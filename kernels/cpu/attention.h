// Reference softmax attention CPU kernels with per-row log-sum-exp (the
// statistic ring attention merges partials with, ALGORITHMS.md §1), GQA, a
// causal mask by global token positions and the optional S2 block mask (§7).
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"
#include "kernels/cpu/s2_pattern.h"

namespace loom::cpu {

// The mask of a dense call (no S2) as the host positions give it, for
// backends with a fixed mask shape (cuDNN): `diagonal` when key j is visible
// to query i exactly when j <= i + offset (offset >= S - 1: every key visible,
// which is also what a call without causal is), every row seeing at least one
// key; else `positions` (only the kernels that read positions take it).
struct MaskForm {
  enum class Kind { positions, diagonal };
  Kind kind = Kind::positions;
  int64_t offset = 0;
  static MaskForm positions() { return {}; }
  static MaskForm diagonal(int64_t offset) { return {Kind::diagonal, offset}; }
  bool is_diagonal() const { return kind == Kind::diagonal; }
  bool operator==(const MaskForm&) const = default;
};
MaskForm mask_form(const int64_t* q_pos, int64_t T, const int64_t* k_pos, int64_t S, bool causal);

// The output gate of gated attention and MoH (ALGORITHMS.md §8, §9), which the attention
// kernels apply where they write the output: out = o * sigmoid(z) * w with o the attention
// output, z one value per (token, head) row ((B, T, H), headwise) or per output element
// ((B, T, H, D), elementwise), w one per row ((B, T, H)); either undefined counts as 1. Same
// dtype as q; sigmoid in fp32 (f64: double).
struct OutputGate {
  Tensor z;
  Tensor w;
  bool defined() const { return z.defined() || w.defined(); }
  bool z_per_row() const { return z.defined() && z.dim() == 3; }
};

// q (B, T, H, D), k and v (B, S, Hkv, D), H % Hkv == 0 (query head h reads kv
// head h / (H / Hkv)); all contiguous, same dtype (f32 or f64).
// q_positions (T), k_positions (S): contiguous i64 global positions, used when
// `causal` (key j visible to query i iff k_positions[j] <= q_positions[i]);
// ignored (may be undefined) otherwise, unless `s2` is enabled: then query i
// of kv head hk also needs s2_block_active(q_pos[i] / Bs, k_pos[j] / Bs, hk, Hkv)
// (the query heads of a GQA group share their kv head's pattern).
// out (B, T, H, D) = softmax(scale * q k^T + mask) v;  lse (B, H, T) = log-sum-exp
// of the visible scaled scores, same dtype as q. A row with no visible key gets
// out = 0 and lse = -inf.
void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                       const S2Pattern& s2, Stream& s);

// Gradients from dout (B, T, H, D) and dlse (B, H, T); either may be undefined
// (counts as zero). Needs only the forward's out and lse besides q, k, v:
//   delta = rowsum(dout * out),  p = exp(scale * q k^T - lse),
//   ds = p * (dout v^T - delta + dlse),  dq = scale * ds k,  dk = scale * ds^T q,  dv = p^T dout,
// with dk, dv summed over the query heads that share a kv head. Rows with
// lse = -inf contribute nothing. dq, dk, dv are overwritten.
// `delta` (B, H, T), when defined, is taken as given (the gated pre-pass below computed it,
// dlse folded in): out and dlse are then not read.
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                        const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                        const S2Pattern& s2, Stream& s, const Tensor& delta = Tensor());

// Gated attention: out = attention(q, k, v) * gate (the forward above, then the gate on each
// output row). `ungated` comes back holding o where the backward needs it (the gate has w: its
// gradient needs o where w is 0), else undefined: the backward works from out alone.
void attention_forward_gated(Tensor& out, Tensor& ungated, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, const OutputGate& gate, const Tensor& q_positions,
                             const Tensor& k_positions, double scale, bool causal, const S2Pattern& s2, Stream& s);

// The gated backward's pre-pass, per (token, head) row, from dy and the gated output y (and
// the ungated o, read only for dw):
//   dout = g dy with g = sigmoid(z) w;  dz = (1 - sigmoid(z)) (dy y summed over the row
//   (headwise) or per element);  dw = sum over the row of dy o sigmoid(z);  delta (B, H, T) =
//   sum over the row of dy y - dlse (= rowsum(dout o) - dlse, the softmax term).
// dz, dw, delta, dlse may be undefined (not wanted / zero); dout, dz, dw are overwritten.
void attention_gate_prepass(Tensor& dout, Tensor& dz, Tensor& dw, Tensor& delta, const Tensor& dy, const Tensor& y,
                            const Tensor& ungated, const Tensor& dlse, const OutputGate& gate);

// dq, dk, dv and the gate's dz, dw (defined where the gate has z, w) of the gated forward:
// the pre-pass, then the backward above (with the pre-pass's delta when `ungated` is undefined).
void attention_backward_gated(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dz, Tensor& dw, const Tensor& dy,
                              const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                              const Tensor& ungated, const Tensor& lse, const OutputGate& gate,
                              const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                              const S2Pattern& s2, Stream& s);

}  // namespace loom::cpu
