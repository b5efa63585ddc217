// Device dispatch of the kernel families (see dispatch.h). Each entry point
// checks that its tensors and stream share one device, then calls cpu::<op>
// or cuda::<op>. Every family has CUDA kernels; a build without CUDA
// (LOOM_CUDA=OFF) compiles the CUDA branches out, and a CUDA tensor reaching
// one there is an error naming the op.
#include "kernels/dispatch.h"

#include <atomic>
#include <initializer_list>

#include "kernels/cpu/activation.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_merge.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/grad_norm.h"
#include "kernels/cpu/lightning.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/reduce.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/softmax.h"

#ifdef LOOM_WITH_CUDA
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/reduce.h"
#include "kernels/cuda/activation.h"
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/rope.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/softmax.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_merge.h"
#include "kernels/cuda/lightning.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/grad_norm.h"
#endif

// WITH_CUDA(op, stream, call): the CUDA call, or (a build without CUDA) an error naming the op.
#ifdef LOOM_WITH_CUDA
#define WITH_CUDA(op, s, ...) __VA_ARGS__
#else
#define WITH_CUDA(op, s, ...) no_cuda_kernel(op, s.device())
#endif

namespace loom::dispatch {

namespace {

std::atomic<AttentionBackend> g_attention_backend{AttentionBackend::automatic};

[[maybe_unused]] [[noreturn]] void no_cuda_kernel(const char* op, Device device) {
  LOOM_FAIL() << op << ": tensors on " << device << " but loom was built without CUDA (LOOM_CUDA=OFF); "
              << "rebuild with CUDA or run on cpu";
}

// Checks that every defined tensor and the stream are on one device; true for the CPU.
bool on_cpu(const char* op, std::initializer_list<const Tensor*> tensors, const Stream& s) {
  for (const Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    LOOM_CHECK(t->device() == s.device()) << op << ": a tensor " << shape_str(t->shape()) << " is on " << t->device()
                                          << " but the op runs on " << s.device()
                                          << " (all operands must be on one device)";
  }
  return s.device().is_cpu();
}

#ifdef LOOM_WITH_CUDA
// cuBLASLt reads matrices with unit column stride whose batch dims collapse to
// one stride; other layouts (e.g. a broadcast over only some batch dims) are
// compacted first.
Tensor gemm_operand(const Tensor& t) {
  if (t.stride(-1) != 1) return t.contiguous();
  if (t.dim() <= 3) return t;
  int64_t expected = t.stride(t.dim() - 3);
  for (int64_t d = t.dim() - 3; d >= 0; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return t.contiguous();
    expected *= t.size(d);
  }
  return t;
}
#endif

}  // namespace

AttentionBackend attention_backend_from_name(const std::string& name) {
  if (name == "auto") return AttentionBackend::automatic;
  if (name == "native") return AttentionBackend::native;
  if (name == "cudnn") return AttentionBackend::cudnn;
  if (name == "interim") return AttentionBackend::interim;
  LOOM_FAIL() << "attention backend \"" << name << "\" is not one of auto, native, cudnn, interim";
}
void set_attention_backend(AttentionBackend backend) { g_attention_backend.store(backend); }
AttentionBackend attention_backend() { return g_attention_backend.load(); }
void set_deterministic(bool deterministic) {
#ifdef LOOM_WITH_CUDA
  cuda::set_deterministic_attention(deterministic);  // the one flag (the CPU kernels always are)
#else
  (void)deterministic;
#endif
}

#ifdef LOOM_WITH_CUDA
namespace {
// The CUDA kernels model.attention_backend picks (see dispatch.h).
cuda::AttentionKernel cuda_attention_kernel() {
  switch (attention_backend()) {
    case AttentionBackend::interim: return cuda::AttentionKernel::interim;
    case AttentionBackend::native: return cuda::AttentionKernel::flash;
    case AttentionBackend::cudnn: return cuda::AttentionKernel::cudnn;
    case AttentionBackend::automatic: break;
  }
  // auto: per shape and direction the faster of cuDNN and flash, timed on first use.
  return cuda::AttentionKernel::best;
}
}  // namespace
#endif

// ---- matrix products ----
void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta,
          Stream& s) {
  if (on_cpu("gemm", {&c, &a, &b}, s)) return cpu::gemm(c, a, b, trans_a, trans_b, alpha, beta, s);
  WITH_CUDA("gemm", s, cuda::gemm(c, gemm_operand(a), gemm_operand(b), trans_a, trans_b, alpha, beta, s));
}

// ---- element-wise and reductions ----
void binary(Tensor& out, const Tensor& a, const Tensor& b, BinaryOp op, Stream& s) {
  if (on_cpu("binary", {&out, &a, &b}, s)) return cpu::binary(out, a, b, op, s);
  WITH_CUDA("binary", s, cuda::binary(out, a, b, op, s));
}
void scale(Tensor& out, const Tensor& x, double alpha, double beta, Stream& s) {
  if (on_cpu("scale", {&out, &x}, s)) return cpu::scale(out, x, alpha, beta, s);
  WITH_CUDA("scale", s, cuda::scale(out, x, alpha, beta, s));
}
void axpy(Tensor& y, const Tensor& x, double alpha, Stream& s) {
  if (on_cpu("axpy", {&y, &x}, s)) return cpu::axpy(y, x, alpha, s);
  WITH_CUDA("axpy", s, cuda::axpy(y, x, alpha, s));
}
void sum_to(Tensor& out, const Tensor& x, Stream& s) {
  if (on_cpu("sum_to", {&out, &x}, s)) return cpu::sum_to(out, x, s);
  WITH_CUDA("sum_to", s, cuda::sum_to(out, x, s));
}
void sum_all(Tensor& out, const Tensor& x, Stream& s) {
  if (on_cpu("sum_all", {&out, &x}, s)) return cpu::sum_all(out, x, s);
  WITH_CUDA("sum_all", s, cuda::sum_all(out, x, s));
}
void sum_dim(Tensor& out, const Tensor& x, int64_t dim, Stream& s) {
  if (on_cpu("sum_dim", {&out, &x}, s)) return cpu::sum_dim(out, x, dim, s);
  WITH_CUDA("sum_dim", s, cuda::sum_dim(out, x, dim, s));
}

// ---- activations, norms, positions, embedding ----
void sigmoid_forward(Tensor& y, const Tensor& x, Stream& s) {
  if (on_cpu("sigmoid", {&y, &x}, s)) return cpu::sigmoid_forward(y, x, s);
  WITH_CUDA("sigmoid", s, cuda::sigmoid_forward(y, x, s));
}
void sigmoid_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s) {
  if (on_cpu("sigmoid_backward", {&dx, &dy, &y}, s)) return cpu::sigmoid_backward(dx, dy, y, s);
  WITH_CUDA("sigmoid_backward", s, cuda::sigmoid_backward(dx, dy, y, s));
}
void silu_forward(Tensor& y, const Tensor& x, Stream& s) {
  if (on_cpu("silu", {&y, &x}, s)) return cpu::silu_forward(y, x, s);
  WITH_CUDA("silu", s, cuda::silu_forward(y, x, s));
}
void silu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Stream& s) {
  if (on_cpu("silu_backward", {&dx, &dy, &x}, s)) return cpu::silu_backward(dx, dy, x, s);
  WITH_CUDA("silu_backward", s, cuda::silu_backward(dx, dy, x, s));
}
void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up, Stream& s) {
  if (on_cpu("swiglu", {&out, &gate, &up}, s)) return cpu::swiglu_forward(out, gate, up, s);
  WITH_CUDA("swiglu", s, cuda::swiglu_forward(out, gate, up, s));
}
void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up, Stream& s) {
  if (on_cpu("swiglu_backward", {&dgate, &dup, &dout, &gate, &up}, s))
    return cpu::swiglu_backward(dgate, dup, dout, gate, up, s);
  WITH_CUDA("swiglu_backward", s, cuda::swiglu_backward(dgate, dup, dout, gate, up, s));
}
void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& z, int64_t span, Stream& s) {
  if (on_cpu("sigmoid_gate", {&y, &x, &z}, s)) return cpu::sigmoid_gate_forward(y, x, z, span, s);
  WITH_CUDA("sigmoid_gate", s, cuda::sigmoid_gate_forward(y, x, z, span, s));
}
void sigmoid_gate_backward(Tensor& dx, Tensor& dz, const Tensor& dy, const Tensor& x, const Tensor& z, int64_t span,
                           Stream& s) {
  if (on_cpu("sigmoid_gate_backward", {&dx, &dz, &dy, &x, &z}, s))
    return cpu::sigmoid_gate_backward(dx, dz, dy, x, z, span, s);
  WITH_CUDA("sigmoid_gate_backward", s, cuda::sigmoid_gate_backward(dx, dz, dy, x, z, span, s));
}
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps, Stream& s) {
  if (on_cpu("rms_norm", {&y, &rstd, &x, &w}, s)) return cpu::rmsnorm_forward(y, rstd, x, w, eps, s);
  WITH_CUDA("rms_norm", s, cuda::rmsnorm_forward(y, rstd, x, w, eps, s));
}
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Stream& s) {
  if (on_cpu("rms_norm_backward", {&dx, &dw, &dy, &x, &w, &rstd}, s))
    return cpu::rmsnorm_backward(dx, dw, dy, x, w, rstd, s);
  WITH_CUDA("rms_norm_backward", s, cuda::rmsnorm_backward(dx, dw, dy, x, w, rstd, s));
}
void rope_forward(Tensor& y, const Tensor& x, const Tensor& positions, double theta, Stream& s) {
  if (on_cpu("rope", {&y, &x, &positions}, s)) return cpu::rope_forward(y, x, positions, theta, s);
  WITH_CUDA("rope", s, cuda::rope_forward(y, x, positions, theta, s));
}
void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& positions, double theta, Stream& s) {
  if (on_cpu("rope_backward", {&dx, &dy, &positions}, s)) return cpu::rope_backward(dx, dy, positions, theta, s);
  WITH_CUDA("rope_backward", s, cuda::rope_backward(dx, dy, positions, theta, s));
}
void embedding_forward(Tensor& out, const Tensor& weight, const Tensor& ids, Stream& s) {
  if (on_cpu("embedding", {&out, &weight, &ids}, s)) return cpu::embedding_forward(out, weight, ids, s);
  WITH_CUDA("embedding", s, cuda::embedding_forward(out, weight, ids, s));
}
void embedding_backward(Tensor& grad_weight, const Tensor& grad_out, const Tensor& ids, Stream& s) {
  if (on_cpu("embedding_backward", {&grad_weight, &grad_out, &ids}, s))
    return cpu::embedding_backward(grad_weight, grad_out, ids, s);
  WITH_CUDA("embedding_backward", s, cuda::embedding_backward(grad_weight, grad_out, ids, s));
}

// ---- softmax, loss, attention ----
void softmax_forward(Tensor& y, const Tensor& x, Stream& s) {
  if (on_cpu("softmax", {&y, &x}, s)) return cpu::softmax_forward(y, x, s);
  WITH_CUDA("softmax", s, cuda::softmax_forward(y, x, s));
}
void softmax_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s) {
  if (on_cpu("softmax_backward", {&dx, &dy, &y}, s)) return cpu::softmax_backward(dx, dy, y, s);
  WITH_CUDA("softmax_backward", s, cuda::softmax_backward(dx, dy, y, s));
}
void cross_entropy_forward(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int64_t ignore_index, bool mean, Stream& s) {
  if (on_cpu("cross_entropy", {&loss, &lse, &logits, &targets}, s))
    return cpu::cross_entropy_forward(loss, lse, logits, targets, ignore_index, mean, s);
  WITH_CUDA("cross_entropy",
                          s, cuda::cross_entropy_forward(loss, lse, logits, targets, ignore_index, mean, s));
}
void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, int64_t ignore_index, bool mean, Stream& s) {
  if (on_cpu("cross_entropy_backward", {&dlogits, &dloss, &logits, &targets, &lse}, s))
    return cpu::cross_entropy_backward(dlogits, dloss, logits, targets, lse, ignore_index, mean, s);
  WITH_CUDA("cross_entropy_backward", s,
                          cuda::cross_entropy_backward(dlogits, dloss, logits, targets, lse, ignore_index, mean, s));
}
void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                       const S2Pattern& s2, Stream& s, cpu::MaskForm form) {
  if (on_cpu("attention", {&out, &lse, &q, &k, &v, &q_positions, &k_positions}, s))
    return cpu::attention_forward(out, lse, q, k, v, q_positions, k_positions, scale, causal, s2, s);
  WITH_CUDA("attention", s,
                      cuda::attention_forward(out, lse, q, k, v, q_positions, k_positions, scale, causal, s2, s,
                                              cuda_attention_kernel(), form));
}
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                        const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                        const S2Pattern& s2, Stream& s, cpu::MaskForm form) {
  if (on_cpu("attention_backward", {&dq, &dk, &dv, &dout, &dlse, &q, &k, &v, &out, &lse, &q_positions, &k_positions},
             s))
    return cpu::attention_backward(dq, dk, dv, dout, dlse, q, k, v, out, lse, q_positions, k_positions, scale,
                                   causal, s2, s);
  WITH_CUDA("attention_backward", s,
                      cuda::attention_backward(dq, dk, dv, dout, dlse, q, k, v, out, lse, q_positions, k_positions,
                                               scale, causal, s2, s, cuda_attention_kernel(), form));
}
void attention_forward_gated(Tensor& out, Tensor& ungated, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, const cpu::OutputGate& gate, const Tensor& q_positions,
                             const Tensor& k_positions, double scale, bool causal, const S2Pattern& s2, Stream& s,
                             cpu::MaskForm form) {
  if (on_cpu("attention", {&out, &lse, &q, &k, &v, &gate.z, &gate.w, &q_positions, &k_positions}, s))
    return cpu::attention_forward_gated(out, ungated, lse, q, k, v, gate, q_positions, k_positions, scale, causal,
                                        s2, s);
  WITH_CUDA("attention", s,
            cuda::attention_forward_gated(out, ungated, lse, q, k, v, gate, q_positions, k_positions, scale, causal,
                                          s2, s, cuda_attention_kernel(), form));
}
void attention_backward_gated(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dz, Tensor& dw, const Tensor& dy,
                              const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                              const Tensor& ungated, const Tensor& lse, const cpu::OutputGate& gate,
                              const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                              const S2Pattern& s2, Stream& s, cpu::MaskForm form) {
  if (on_cpu("attention_backward", {&dq, &dk, &dv, &dz, &dw, &dy, &dlse, &q, &k, &v, &y, &ungated, &lse, &gate.z,
                                    &gate.w, &q_positions, &k_positions},
             s))
    return cpu::attention_backward_gated(dq, dk, dv, dz, dw, dy, dlse, q, k, v, y, ungated, lse, gate, q_positions,
                                         k_positions, scale, causal, s2, s);
  WITH_CUDA("attention_backward", s,
            cuda::attention_backward_gated(dq, dk, dv, dz, dw, dy, dlse, q, k, v, y, ungated, lse, gate, q_positions,
                                           k_positions, scale, causal, s2, s, cuda_attention_kernel(), form));
}
void attention_merge(Tensor& out_acc, Tensor& lse_acc, const Tensor& part_out, const Tensor& part_lse,
                     int64_t row_start, Stream& s) {
  if (on_cpu("attention_merge", {&out_acc, &lse_acc, &part_out, &part_lse}, s))
    return cpu::attention_merge(out_acc, lse_acc, part_out, part_lse, row_start, s);
  WITH_CUDA("attention_merge", s, cuda::attention_merge(out_acc, lse_acc, part_out, part_lse, row_start, s));
}
void lightning_forward(Tensor& out, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                       int64_t block_size, Stream& s, Tensor* saved_states) {
  // decay_lambdas stay on the host on every device (the kernels form the decay powers there).
  if (on_cpu("lightning_attention", {&out, &final_state, &q, &k, &v, &initial_state}, s)) {
    if (saved_states != nullptr) *saved_states = Tensor();
    return cpu::lightning_forward(out, final_state, q, k, v, initial_state, decay_lambdas, out_scale, block_size, s);
  }
  WITH_CUDA("lightning_attention", s,
                      cuda::lightning_forward(out, final_state, q, k, v, initial_state, decay_lambdas, out_scale,
                                              block_size, s, saved_states));
}
void lightning_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dinitial_state, const Tensor& dout,
                        const Tensor& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& initial_state, const Tensor& decay_lambdas, double out_scale,
                        int64_t block_size, Stream& s, const Tensor& saved_states) {
  if (on_cpu("lightning_attention_backward",
             {&dq, &dk, &dv, &dinitial_state, &dout, &dfinal_state, &q, &k, &v, &initial_state}, s))
    return cpu::lightning_backward(dq, dk, dv, dinitial_state, dout, dfinal_state, q, k, v, initial_state,
                                   decay_lambdas, out_scale, block_size, s);
  WITH_CUDA("lightning_attention_backward", s,
                      cuda::lightning_backward(dq, dk, dv, dinitial_state, dout, dfinal_state, q, k, v,
                                               initial_state, decay_lambdas, out_scale, block_size, s,
                                               saved_states));
}

// ---- MoE dispatch ----
void index_select_rows(Tensor& out, const Tensor& x, const Tensor& index, Stream& s) {
  if (on_cpu("index_select_rows", {&out, &x, &index}, s)) return cpu::index_select_rows(out, x, index, s);
  WITH_CUDA("index_select_rows", s, cuda::index_select_rows(out, x, index, s));
}
void index_add_rows(Tensor& out, const Tensor& rows, const Tensor& index, Stream& s) {
  if (on_cpu("index_add_rows", {&out, &rows, &index}, s)) return cpu::index_add_rows(out, rows, index, s);
  WITH_CUDA("index_add_rows", s, cuda::index_add_rows(out, rows, index, s));
}
void logsumexp_forward(Tensor& lse, const Tensor& x, Stream& s) {
  if (on_cpu("logsumexp", {&lse, &x}, s)) return cpu::logsumexp_forward(lse, x, s);
  WITH_CUDA("logsumexp", s, cuda::logsumexp_forward(lse, x, s));
}
void logsumexp_backward(Tensor& grad_x, const Tensor& grad_lse, const Tensor& x, const Tensor& lse, Stream& s) {
  if (on_cpu("logsumexp_backward", {&grad_x, &grad_lse, &x, &lse}, s))
    return cpu::logsumexp_backward(grad_x, grad_lse, x, lse, s);
  WITH_CUDA("logsumexp_backward", s, cuda::logsumexp_backward(grad_x, grad_lse, x, lse, s));
}
void grouped_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                            Stream& s) {
  if (on_cpu("grouped_linear", {&y, &x, &w}, s)) return cpu::grouped_linear_forward(y, x, w, offsets, s);
  WITH_CUDA("grouped_linear", s, cuda::grouped_linear_forward(y, x, w, offsets, s));
}
void grouped_linear_backward(Tensor& grad_x, Tensor& grad_w, const Tensor& grad_y, const Tensor& x, const Tensor& w,
                             const std::vector<int64_t>& offsets, Stream& s) {
  if (on_cpu("grouped_linear_backward", {&grad_x, &grad_w, &grad_y, &x, &w}, s))
    return cpu::grouped_linear_backward(grad_x, grad_w, grad_y, x, w, offsets, s);
  WITH_CUDA("grouped_linear_backward", s, cuda::grouped_linear_backward(grad_x, grad_w, grad_y, x, w, offsets, s));
}
void topk_rows(Tensor& indices, const Tensor& scores, int64_t k, Stream& s) {
  if (on_cpu("topk", {&indices, &scores}, s)) return cpu::topk_rows(indices, scores, k, s);
  WITH_CUDA("topk", s, cuda::topk_rows(indices, scores, k, s));
}
void topk_mask_rows(Tensor& mask, const Tensor& scores, int64_t k, Stream& s) {
  if (on_cpu("topk_mask", {&mask, &scores}, s)) return cpu::topk_mask_rows(mask, scores, k, s);
  WITH_CUDA("topk_mask", s, cuda::topk_mask_rows(mask, scores, k, s));
}
void moh_gate_rows(Tensor& gate, const Tensor& p, const Tensor& mask, const Tensor& z, int64_t shared, int64_t k,
                   Stream& s) {
  if (on_cpu("moh_gate", {&gate, &p, &mask}, s)) return cpu::moh_gate_rows(gate, p, mask, z, shared, k, s);
  WITH_CUDA("moh_gate", s, cuda::moh_gate_rows(gate, p, mask, z, shared, k, s));
}
void moh_gate_rows_backward(Tensor& dp, Tensor& dz, const Tensor& dgate, const Tensor& p, const Tensor& mask,
                            const Tensor& z, int64_t shared, int64_t k, Stream& s) {
  if (on_cpu("moh_gate_backward", {&dp, &dgate, &p, &mask}, s))
    return cpu::moh_gate_rows_backward(dp, dz, dgate, p, mask, z, shared, k, s);
  WITH_CUDA("moh_gate_backward", s, cuda::moh_gate_rows_backward(dp, dz, dgate, p, mask, z, shared, k, s));
}

// ---- optimizer and clipping ----
void adamw_step(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                const AdamWScalars& scalars, Stream& s) {
  if (on_cpu("adamw", {&param, &exp_avg, &exp_avg_sq, &compute, &grad}, s))
    return cpu::adamw_step(param, exp_avg, exp_avg_sq, compute, grad, scalars, s);
  WITH_CUDA("adamw", s, cuda::adamw_step(param, exp_avg, exp_avg_sq, compute, grad, scalars, s));
}
void sum_squares(Tensor& out, const Tensor& x, Stream& s) {
  if (on_cpu("grad_norm", {&out, &x}, s)) return cpu::sum_squares(out, x, s);
  WITH_CUDA("grad_norm", s, cuda::sum_squares(out, x, s));
}
void scale_inplace(Tensor& x, double alpha, Stream& s) {
  if (on_cpu("clip_grad_norm", {&x}, s)) return cpu::scale_inplace(x, alpha, s);
  WITH_CUDA("clip_grad_norm", s, cuda::scale_inplace(x, alpha, s));
}
void count_nonfinite(Tensor& out, const Tensor& x, Stream& s) {
  if (on_cpu("grads_finite", {&out, &x}, s)) return cpu::count_nonfinite(out, x, s);
  WITH_CUDA("grads_finite", s, cuda::count_nonfinite(out, x, s));
}


// ---- many tensors per call ----
namespace {
bool on_cpu_many(const char* op, const std::vector<Tensor>& xs, const Tensor* out, const Stream& s) {
  for (const Tensor& x : xs) on_cpu(op, {&x}, s);
  return on_cpu(op, {out}, s);
}
}  // namespace

void adamw_step_many(std::vector<AdamWSpan>& spans, const AdamWScalars& scalars, Stream& s) {
  for (AdamWSpan& span : spans)
    on_cpu("adamw", {&span.param, &span.exp_avg, &span.exp_avg_sq, &span.compute, &span.grad}, s);
  if (s.device().is_cpu()) {
    for (AdamWSpan& span : spans) {
      AdamWScalars one = scalars;
      one.weight_decay = span.weight_decay;
      cpu::adamw_step(span.param, span.exp_avg, span.exp_avg_sq, span.compute, span.grad, one, s);
    }
    return;
  }
  if (spans.empty()) return;
#ifdef LOOM_WITH_CUDA
  std::vector<cuda::AdamWSpan> device_spans;
  device_spans.reserve(spans.size());
  for (AdamWSpan& span : spans)
    device_spans.push_back({span.param, span.exp_avg, span.exp_avg_sq, span.compute, span.grad, span.weight_decay});
  cuda::adamw_step_many(device_spans, scalars, s);
#else
  no_cuda_kernel("adamw", s.device());
#endif
}

void sum_squares_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s) {
  if (on_cpu_many("grad_norm", xs, &out, s)) {
    for (size_t i = 0; i < xs.size(); ++i) {
      Tensor slot = out.select(0, static_cast<int64_t>(i));
      cpu::sum_squares(slot, xs[i], s);
    }
    return;
  }
  WITH_CUDA("grad_norm", s, cuda::sum_squares_many(out, xs, s));
}

void count_nonfinite_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s) {
  if (on_cpu_many("grads_finite", xs, &out, s)) {
    for (size_t i = 0; i < xs.size(); ++i) {
      Tensor slot = out.select(0, static_cast<int64_t>(i));
      cpu::count_nonfinite(slot, xs[i], s);
    }
    return;
  }
  WITH_CUDA("grads_finite", s, cuda::count_nonfinite_many(out, xs, s));
}

void scale_inplace_many(const std::vector<Tensor>& xs, double alpha, Stream& s) {
  if (on_cpu_many("clip_grad_norm", xs, nullptr, s)) {
    for (const Tensor& x : xs) {
      Tensor t = x;
      cpu::scale_inplace(t, alpha, s);
    }
    return;
  }
  WITH_CUDA("clip_grad_norm", s, cuda::scale_inplace_many(xs, alpha, s));
}

}  // namespace loom::dispatch
