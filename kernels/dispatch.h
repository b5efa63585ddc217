// Device dispatch of the kernel families: one entry point per kernel, with the
// CPU twin's signature, that checks every tensor argument sits on one device
// and runs the CPU kernel (kernels/cpu) or its CUDA twin (kernels/cuda). This
// is the one place where device is decided (DESIGN.md §3 "dispatch once at the
// entry point"); the differentiable ops in framework/ call only these. In a
// build without CUDA a CUDA tensor fails with an error naming the op, never a
// crash; dtype support is each kernel's own check (CPU: f32/f64; CUDA: f32/bf16/f16).
#pragma once

#include <string>
#include <vector>

#include "framework/stream.h"
#include "framework/tensor.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/s2_pattern.h"

namespace loom::dispatch {

using cpu::AdamWScalars;
using cpu::BinaryOp;

// ---- kernel choices (process-wide) ----
// model.attention_backend: which CUDA softmax-attention kernels run.
//   native   the flash kernels (tensor cores) where they apply — bf16, head dim
//            64 or 128 — and the interim CUDA-core kernels elsewhere
//   cudnn    cuDNN's fused attention where it takes the call (dense, bf16, head
//            dim 64/128, a causal mask on the diagonal or none: `form` below;
//            backward: lengths multiples of 128, no lse gradient), native
//            elsewhere; an error when cuDNN is missing or has no engine
//   interim  the CUDA-core kernels everywhere (fp32 math)
//   auto     per shape and direction, cuDNN or native, whichever ran faster
//            when both were timed on the shape's first call (native where
//            cuDNN does not take the call)
// CPU tensors always run the CPU twin.
enum class AttentionBackend { automatic, native, cudnn, interim };
AttentionBackend attention_backend_from_name(const std::string& name);  // throws naming the value
void set_attention_backend(AttentionBackend backend);  // default automatic
AttentionBackend attention_backend();
// train.deterministic: kernels whose results repeat bitwise from run to run.
// Off (default), the native flash backward is one fused pass that adds dQ with
// atomics and auto may take cuDNN's backward (also atomic); on, the flash
// backward runs its two kernels without atomics and cuDNN only forward. The
// CPU kernels are deterministic either way.
void set_deterministic(bool deterministic);

// ---- matrix products (kernels/cpu/matmul.h) ----
void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta,
          Stream& s);

// ---- element-wise and reductions (kernels/cpu/elementwise.h, reduce.h) ----
void binary(Tensor& out, const Tensor& a, const Tensor& b, BinaryOp op, Stream& s);
void scale(Tensor& out, const Tensor& x, double alpha, double beta, Stream& s);
void axpy(Tensor& y, const Tensor& x, double alpha, Stream& s);
void sum_to(Tensor& out, const Tensor& x, Stream& s);
void sum_all(Tensor& out, const Tensor& x, Stream& s);
void sum_dim(Tensor& out, const Tensor& x, int64_t dim, Stream& s);

// ---- activations, norms, positions, embedding ----
void sigmoid_forward(Tensor& y, const Tensor& x, Stream& s);
void sigmoid_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s);
void silu_forward(Tensor& y, const Tensor& x, Stream& s);
void silu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Stream& s);
void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up, Stream& s);
void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up, Stream& s);
void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& z, int64_t span, Stream& s);
void sigmoid_gate_backward(Tensor& dx, Tensor& dz, const Tensor& dy, const Tensor& x, const Tensor& z, int64_t span,
                           Stream& s);
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps, Stream& s);
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Stream& s);
void rope_forward(Tensor& y, const Tensor& x, const Tensor& positions, double theta, Stream& s);
void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& positions, double theta, Stream& s);
void embedding_forward(Tensor& out, const Tensor& weight, const Tensor& ids, Stream& s);
void embedding_backward(Tensor& grad_weight, const Tensor& grad_out, const Tensor& ids, Stream& s);

// ---- softmax, loss, attention ----
void softmax_forward(Tensor& y, const Tensor& x, Stream& s);
void softmax_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s);
void cross_entropy_forward(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int64_t ignore_index, bool mean, Stream& s);
void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, int64_t ignore_index, bool mean, Stream& s);
void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                       const S2Pattern& s2, Stream& s, cpu::MaskForm form = {});
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                        const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                        const S2Pattern& s2, Stream& s, cpu::MaskForm form = {});
// Gated attention: out = attention * gate, the gate in the kernels' epilogue and its gradient
// in the backward pre-pass (kernels/cpu/attention.h: OutputGate; `ungated` comes back holding o
// where the backward needs it, else undefined; dz, dw like gate.z, gate.w).
void attention_forward_gated(Tensor& out, Tensor& ungated, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, const cpu::OutputGate& gate, const Tensor& q_positions,
                             const Tensor& k_positions, double scale, bool causal, const S2Pattern& s2, Stream& s,
                             cpu::MaskForm form = {});
void attention_backward_gated(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dz, Tensor& dw, const Tensor& dy,
                              const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                              const Tensor& ungated, const Tensor& lse, const cpu::OutputGate& gate,
                              const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                              const S2Pattern& s2, Stream& s, cpu::MaskForm form = {});
// Folds a partial attention result into a running one (ALGORITHMS.md §1,
// kernels/cpu/attention_merge.h); on CUDA out_acc, lse_acc and part_lse are
// f32 and part_out may be bf16 (part of the "attention" family).
void attention_merge(Tensor& out_acc, Tensor& lse_acc, const Tensor& part_out, const Tensor& part_lse,
                     int64_t row_start, Stream& s);
// saved_states: what the CUDA backward can reuse of the forward (kernels/cuda/
// lightning.h); the CPU kernels save nothing (it comes back undefined) and
// recompute.
void lightning_forward(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                       int64_t block_size, Stream& s, Tensor* saved_states = nullptr);
void lightning_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                        const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                        int64_t block_size, Stream& s, const Tensor& saved_states = Tensor());

// ---- MoE dispatch (kernels/cpu/moe.h) ----
void index_select_rows(Tensor& out, const Tensor& x, const Tensor& index, Stream& s);
void index_add_rows(Tensor& out, const Tensor& rows, const Tensor& index, Stream& s);
void logsumexp_forward(Tensor& lse, const Tensor& x, Stream& s);
void logsumexp_backward(Tensor& grad_x, const Tensor& grad_lse, const Tensor& x, const Tensor& lse, Stream& s);
void grouped_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                            Stream& s);
void grouped_linear_backward(Tensor& grad_x, Tensor& grad_w, const Tensor& grad_y, const Tensor& x, const Tensor& w,
                             const std::vector<int64_t>& offsets, Stream& s);
void topk_rows(Tensor& indices, const Tensor& scores, int64_t k, Stream& s);
void topk_mask_rows(Tensor& mask, const Tensor& scores, int64_t k, Stream& s);
void moh_gate_rows(Tensor& gate, const Tensor& p, const Tensor& mask, const Tensor& z, int64_t shared, int64_t k,
                   Stream& s);
void moh_gate_rows_backward(Tensor& dp, Tensor& dz, const Tensor& dgate, const Tensor& p, const Tensor& mask,
                            const Tensor& z, int64_t shared, int64_t k, Stream& s);

// ---- optimizer and clipping (kernels/cpu/adamw.h, grad_norm.h) ----
void adamw_step(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                const AdamWScalars& scalars, Stream& s);
void sum_squares(Tensor& out, const Tensor& x, Stream& s);
void scale_inplace(Tensor& x, double alpha, Stream& s);
void count_nonfinite(Tensor& out, const Tensor& x, Stream& s);

// Many tensors per call (the optimizer's and clipping's per-step loops): one
// launch per dtype combination on CUDA (kernels/cuda multi-tensor kernels),
// the single-tensor CPU kernel per entry on the CPU; same results either way.
struct AdamWSpan {
  Tensor param, exp_avg, exp_avg_sq, compute, grad;  // compute undefined: param is its own master
  double weight_decay = 0.0;                          // this span's decoupled decay
};
void adamw_step_many(std::vector<AdamWSpan>& spans, const AdamWScalars& scalars, Stream& s);
// out (len(xs), f64)[i] = sum of squares of xs[i]; out (len(xs), i64)[i] = NaN/Inf count of xs[i].
void sum_squares_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s);
void count_nonfinite_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s);
void scale_inplace_many(const std::vector<Tensor>& xs, double alpha, Stream& s);

}  // namespace loom::dispatch
