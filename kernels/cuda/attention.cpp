// Entry points of the CUDA attention kernels (see attention.h): operand checks
// and the S2 rule's host-side constants, then the launches in attention.cu.
// This file is C++20 (it needs S2Pattern); the kernels are compiled as C++17.
#include "kernels/cuda/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "framework/cuda_check.h"
#include "kernels/cpu/s2_pattern.h"
#include "kernels/cuda/attention_launch.h"
#include "kernels/cuda/cudnn_attention.h"

namespace loom::cuda {

namespace {

void check_device(const Tensor& t, const Stream& s, const char* op, const char* name) {
  LOOM_CHECK(t.defined()) << op << ": " << name << " is undefined";
  LOOM_CHECK(t.device().is_cuda() && t.device() == s.device())
      << op << ": " << name << " must be on " << s.device() << ", is on " << t.device();
  LOOM_CHECK(t.is_contiguous()) << op << ": " << name << " " << shape_str(t.shape()) << " must be contiguous, strides "
                                << shape_str(t.strides());
}

void check_like(const Tensor& t, const Shape& shape, DType dtype, const Stream& s, const char* op, const char* name) {
  check_device(t, s, op, name);
  LOOM_CHECK(t.shape() == shape) << op << ": " << name << " shape " << shape_str(t.shape()) << ", expected "
                                 << shape_str(shape);
  LOOM_CHECK(t.dtype() == dtype) << op << ": " << name << " dtype " << t.dtype() << ", expected " << dtype;
}

detail::AttentionDims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_positions,
                                   const Tensor& k_positions, double scale, bool causal, const S2Pattern& s2,
                                   const Stream& s, const char* op, detail::AttentionMask& mask) {
  check_device(q, s, op, "q");
  LOOM_CHECK(q.dim() == 4 && k.dim() == 4) << op << ": q " << shape_str(q.shape()) << " must be (B, T, H, D) and k "
                                           << shape_str(k.shape()) << " (B, S, Hkv, D)";
  LOOM_CHECK(q.dtype() == DType::bf16 || q.dtype() == DType::f32) << op << ": dtype " << q.dtype()
                                                                  << " is not supported (bf16, f32)";
  detail::AttentionDims n{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  LOOM_CHECK(k.size(0) == n.B && k.size(3) == n.D) << op << ": k shape " << shape_str(k.shape())
                                                   << " does not match q " << shape_str(q.shape())
                                                   << " in batch or head dim";
  LOOM_CHECK(n.Hkv > 0 && n.H % n.Hkv == 0) << op << ": H = " << n.H << " query heads is not a multiple of Hkv = "
                                            << n.Hkv << " kv heads";
  LOOM_CHECK(n.D <= detail::kMaxAttentionHeadDim) << op << ": head dim D = " << n.D << " is above "
                                                  << detail::kMaxAttentionHeadDim << " (CUDA kernel limit)";
  LOOM_CHECK(std::isfinite(scale)) << op << ": scale = " << scale << " is not finite";
  check_like(k, k.shape(), q.dtype(), s, op, "k");
  check_like(v, k.shape(), q.dtype(), s, op, "v");
  mask.causal = causal;
  if (s2.enabled()) {
    LOOM_CHECK(s2.local_blocks >= 1 && s2.vert_stride >= 1)
        << op << ": S2 local_blocks = " << s2.local_blocks << " and vert_stride = " << s2.vert_stride
        << " must be >= 1";
    mask.s2_block = s2.block;
    mask.s2_local = s2.local_blocks;
    mask.s2_stride = s2.vert_stride;
    mask.s2_offset = s2_stride_offset(s2.vert_stride, n.Hkv);
  }
  if (causal || s2.enabled()) {
    check_like(q_positions, {n.T}, DType::i64, s, op, "q_positions");
    check_like(k_positions, {n.S}, DType::i64, s, op, "k_positions");
    mask.q_pos = q_positions.data<int64_t>();
    mask.k_pos = k_positions.data<int64_t>();
  }
  return n;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// i64 scratch on the stream's pool (at least one element).
Storage scratch_i64(int64_t count, const Tensor& like, Stream& s) {
  return Storage(static_cast<size_t>(std::max<int64_t>(1, count)) * sizeof(int64_t), like.device(), &s);
}

// ---- cuDNN or flash ----

// Whether a call goes to cuDNN at all: the kernel choice allows it, the call is
// dense with a mask form cuDNN has, and cuDNN takes the operands.
bool cudnn_candidate(AttentionKernel kernel, cpu::MaskForm form, const S2Pattern& s2, const Tensor& q, const Tensor& k,
                     const Tensor& v, bool backward) {
  if (kernel != AttentionKernel::cudnn && kernel != AttentionKernel::best) return false;
  if (s2.enabled() || !form.is_diagonal()) return false;
  // cuDNN's backward accumulates dQ with atomics: a deterministic run leaves it to the flash kernels
  // (said once on stderr when the backend was asked for by name).
  if (backward && deterministic_attention()) {
    static std::once_flag said;
    if (kernel == AttentionKernel::cudnn)
      std::call_once(said, [] {
        std::fprintf(stderr, "loom: model.attention_backend = cudnn under train.deterministic: cuDNN runs the "
                             "attention forward only; the backward runs the native deterministic kernels (cuDNN's "
                             "backward adds dQ with atomics)\n");
      });
    return false;
  }
  if (kernel == AttentionKernel::cudnn) {
    LOOM_CHECK(cudnn_attention_available()) << "attention: model.attention_backend = cudnn but cuDNN is not "
                                            << "available (" << cudnn_attention_version() << ")";
  }
  return cudnn_attention_takes(q, k, v, backward);
}

// best: which of cuDNN and flash runs a shape, decided by timing both on its first call.
using ChoiceKey = AttentionShape;
std::mutex choices_mutex;
std::map<ChoiceKey, bool> choices;  // true: cuDNN

// Device milliseconds of one run of `work` on `s` (waits for it).
float time_on(Stream& s, const std::function<void()>& work) {
  cudaStream_t stream = static_cast<cudaStream_t>(s.handle());
  cudaEvent_t start, stop;
  LOOM_CUDA_CHECK(cudaEventCreate(&start));
  LOOM_CUDA_CHECK(cudaEventCreate(&stop));
  LOOM_CUDA_CHECK(cudaEventRecord(start, stream));
  work();
  LOOM_CUDA_CHECK(cudaEventRecord(stop, stream));
  LOOM_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  LOOM_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
}

// Runs the call on cuDNN or on flash (`run_cudnn` returns false when cuDNN has
// no engine for the shape). Returns true when the outputs are written; false:
// the caller runs the flash kernels.
bool run_cudnn_or_best(AttentionKernel kernel, const ChoiceKey& key, const std::function<bool()>& run_cudnn,
                       const std::function<void()>& run_flash, Stream& s) {
  // (a shape cuDNN has no engine for runs on flash; cudnn_attention.cpp says so once per shape on stderr)
  if (kernel == AttentionKernel::cudnn) return run_cudnn();
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    auto it = choices.find(key);
    if (it != choices.end()) {
      if (!it->second) return false;
      LOOM_CHECK(run_cudnn()) << "attention: cuDNN lost its plan for a shape it ran before";
      return true;
    }
  }
  // First call of the shape: both warmed up, then each timed once. Every run
  // writes the same outputs; the winner runs last, so the first call's
  // result is the one every later call of the shape gets.
  const bool has_plan = run_cudnn();
  bool use_cudnn = false;
  if (has_plan) {
    run_flash();
    float cudnn_ms = time_on(s, [&] { run_cudnn(); });
    float flash_ms = time_on(s, run_flash);  // flash ran last
    use_cudnn = cudnn_ms < flash_ms;
    if (use_cudnn) run_cudnn();
  }
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    choices[key] = use_cudnn;
  }
  return has_plan;  // written by the winner; without a plan nothing is written
}

// ---- the output gate

void check_gate(const cpu::OutputGate& gate, const detail::AttentionDims& n, DType dtype, const Stream& s,
                const char* op) {
  if (gate.z.defined()) {
    const bool per_row = gate.z.dim() == 3;
    check_like(gate.z, per_row ? Shape{n.B, n.T, n.H} : Shape{n.B, n.T, n.H, n.D}, dtype, s, op, "gate z");
  }
  if (gate.w.defined()) check_like(gate.w, {n.B, n.T, n.H}, dtype, s, op, "gate w");
}

detail::AttentionGate raw_gate(const cpu::OutputGate& gate) {
  detail::AttentionGate g;
  g.z = gate.z.defined() ? gate.z.raw_data() : nullptr;
  g.w = gate.w.defined() ? gate.w.raw_data() : nullptr;
  g.z_per_row = gate.z_per_row();
  return g;
}

// The fused epilogue reads z in pairs: 16-byte aligned gate tensors (as allocated).
bool gate_aligned(const cpu::OutputGate& gate) {
  return (!gate.z.defined() || aligned16(gate.z.raw_data())) && (!gate.w.defined() || aligned16(gate.w.raw_data()));
}

// The flash backward (fused, or the deterministic two kernels): delta is computed from dout
// and out, or, with out null, given.
void run_flash_backward(Tensor& dq, Tensor& dk, Tensor& dv, float* delta, const void* dout, const float* dlse,
                        const Tensor& q, const Tensor& k, const Tensor& v, const void* out, const Tensor& lse,
                        const detail::AttentionDims& n, const detail::AttentionMask& mask, double scale, Stream& s) {
  Storage scratch = scratch_i64(detail::flash_attention_scratch(n), q, s);
  // The fused backward's fp32 dQ accumulator; none for the deterministic kernels.
  std::unique_ptr<Storage> dq_acc;
  if (!deterministic_attention())
    dq_acc = std::make_unique<Storage>(
        static_cast<size_t>(std::max<int64_t>(1, detail::flash_dq_acc_elems(n))) * sizeof(float), q.device(), &s);
  detail::launch_flash_attention_backward(dq.raw_data(), dk.raw_data(), dv.raw_data(), delta,
                                          static_cast<int64_t*>(scratch.data()),
                                          dq_acc ? static_cast<float*>(dq_acc->data()) : nullptr, dout, dlse,
                                          q.raw_data(), k.raw_data(), v.raw_data(), out, lse.data<float>(), n, mask,
                                          static_cast<float>(scale), static_cast<cudaStream_t>(s.handle()));
}


}  // namespace

namespace {
std::atomic<bool> g_deterministic{false};
}  // namespace

void set_deterministic_attention(bool deterministic) { g_deterministic = deterministic; }
bool deterministic_attention() { return g_deterministic; }

bool flash_attention_applies(const Tensor& q, const Tensor& k, const Tensor& v) {
  return q.defined() && k.defined() && v.defined() && q.dim() == 4 &&
         detail::flash_attention_supports(q.dtype(), q.size(3)) && aligned16(q.raw_data()) &&
         aligned16(k.raw_data()) && aligned16(v.raw_data());
}

namespace {

// The forward, plain (gate undefined: o into out) or gated (attention_forward_gated).
void run_forward(Tensor& out, Tensor& ungated, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                 const cpu::OutputGate& gate, const Tensor& q_positions, const Tensor& k_positions, double scale,
                 bool causal, const S2Pattern& s2, Stream& s, AttentionKernel kernel, cpu::MaskForm form,
                 const char* op) {
  detail::AttentionMask mask;
  detail::AttentionDims n = check_inputs(q, k, v, q_positions, k_positions, scale, causal, s2, s, op, mask);
  check_like(out, q.shape(), q.dtype(), s, op, "out");
  check_like(lse, {n.B, n.H, n.T}, DType::f32, s, op, "lse");
  const bool gated = gate.defined();
  if (gated) check_gate(gate, n, q.dtype(), s, op);
  detail::AttentionGate g = raw_gate(gate);
  cudaStream_t stream = static_cast<cudaStream_t>(s.handle());
  // The flash forward keeps row maxima of the raw scores (scaled on use), which needs scale > 0.
  const bool flash = kernel != AttentionKernel::interim && scale > 0 && flash_attention_applies(q, k, v) &&
                     aligned16(out.raw_data()) && gate_aligned(gate);
  // Where o goes on the paths without the fused gate: out, or (gated) `ungated`, the gate after it.
  auto o_target = [&]() -> Tensor& {
    if (!gated) return out;
    if (!ungated.defined()) ungated = Tensor::empty(q.shape(), q.dtype(), q.device());
    return ungated;
  };
  auto gate_after = [&] {
    if (gated) detail::launch_attention_gate_apply(q.dtype(), out.raw_data(), ungated.raw_data(), g, n, stream);
  };
  bool fused = false;  // the output the call leaves is the flash kernels' (the gate in their epilogue)
  auto run_flash = [&] {
    Storage scratch = scratch_i64(detail::flash_attention_scratch(n), q, s);
    g.ungated = gate.w.defined() ? o_target().raw_data() : nullptr;  // o too where the gate has w
    detail::launch_flash_attention_forward(out.raw_data(), lse.data<float>(), q.raw_data(), k.raw_data(),
                                           v.raw_data(), static_cast<int64_t*>(scratch.data()), n, mask,
                                           static_cast<float>(scale), stream, g);
    fused = true;
  };
  // The sigmoid gate alone: the fused forward's backward works from out; o is not kept.
  auto finish = [&] {
    if (gated && fused && !gate.w.defined()) ungated = Tensor();
  };
  if (flash && aligned16(lse.raw_data()) && cudnn_candidate(kernel, form, s2, q, k, v, false)) {
    const int64_t diagonal = causal ? std::min(form.offset, n.S) : n.S;
    auto run_cudnn = [&] {
      const bool ran = cudnn_attention_forward(o_target(), lse, q, k, v, diagonal, scale, s);
      if (ran) gate_after();
      fused = false;
      return ran;
    };
    if (run_cudnn_or_best(kernel, attention_shape(q, k, false, diagonal), run_cudnn, run_flash, s)) return finish();
  }
  if (flash) {
    run_flash();
    return finish();
  }
  detail::launch_attention_forward(q.dtype(), o_target().raw_data(), lse.data<float>(), q.raw_data(), k.raw_data(),
                                   v.raw_data(), n, mask, static_cast<float>(scale), stream);
  gate_after();
}

}  // namespace

void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                       const S2Pattern& s2, Stream& s, AttentionKernel kernel, cpu::MaskForm form) {
  Tensor none;
  run_forward(out, none, lse, q, k, v, cpu::OutputGate{}, q_positions, k_positions, scale, causal, s2, s, kernel,
              form, "attention_forward");
}

void attention_forward_gated(Tensor& out, Tensor& ungated, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, const cpu::OutputGate& gate, const Tensor& q_positions,
                             const Tensor& k_positions, double scale, bool causal, const S2Pattern& s2, Stream& s,
                             AttentionKernel kernel, cpu::MaskForm form) {
  LOOM_CHECK(gate.defined()) << "attention_forward_gated: the gate has neither z nor w";
  ungated = Tensor();
  run_forward(out, ungated, lse, q, k, v, gate, q_positions, k_positions, scale, causal, s2, s, kernel, form,
              "attention_forward_gated");
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& dlse, const Tensor& q,
                        const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                        const S2Pattern& s2, Stream& s, AttentionKernel kernel, cpu::MaskForm form) {
  const char* op = "attention_backward";
  detail::AttentionMask mask;
  detail::AttentionDims n = check_inputs(q, k, v, q_positions, k_positions, scale, causal, s2, s, op, mask);
  check_like(dq, q.shape(), q.dtype(), s, op, "dq");
  check_like(dk, k.shape(), q.dtype(), s, op, "dk");
  check_like(dv, k.shape(), q.dtype(), s, op, "dv");
  check_like(out, q.shape(), q.dtype(), s, op, "out");
  check_like(lse, {n.B, n.H, n.T}, DType::f32, s, op, "lse");
  if (dout.defined()) check_like(dout, q.shape(), q.dtype(), s, op, "dout");
  if (dlse.defined()) check_like(dlse, {n.B, n.H, n.T}, DType::f32, s, op, "dlse");
  // delta (B, H, T): rowsum(dout * out) - dlse, on the stream's pool.
  Storage delta(static_cast<size_t>(std::max<int64_t>(1, n.B * n.H * n.T)) * sizeof(float), q.device(), &s);
  const bool flash = kernel != AttentionKernel::interim && dout.defined() && flash_attention_applies(q, k, v) &&
                     aligned16(dout.raw_data()) && aligned16(dq.raw_data()) && aligned16(dk.raw_data()) &&
                     aligned16(dv.raw_data());
  auto run_flash = [&] {
    run_flash_backward(dq, dk, dv, static_cast<float*>(delta.data()), dout.raw_data(),
                       dlse.defined() ? dlse.data<float>() : nullptr, q, k, v, out.raw_data(), lse, n, mask, scale, s);
  };
  // cuDNN's backward has no lse gradient: calls with one stay on flash.
  if (flash && !dlse.defined() && aligned16(out.raw_data()) && aligned16(lse.raw_data()) &&
      cudnn_candidate(kernel, form, s2, q, k, v, true)) {
    const int64_t diagonal = causal ? std::min(form.offset, n.S) : n.S;
    auto run_cudnn = [&] { return cudnn_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, diagonal, scale, s); };
    if (run_cudnn_or_best(kernel, attention_shape(q, k, true, diagonal), run_cudnn, run_flash, s)) return;
  }
  if (flash) return run_flash();
  detail::launch_attention_backward(q.dtype(), dq.raw_data(), dk.raw_data(), dv.raw_data(),
                                    static_cast<float*>(delta.data()), dout.defined() ? dout.raw_data() : nullptr,
                                    dlse.defined() ? dlse.data<float>() : nullptr, q.raw_data(), k.raw_data(),
                                    v.raw_data(), out.raw_data(), lse.data<float>(), n, mask,
                                    static_cast<float>(scale), static_cast<cudaStream_t>(s.handle()));
}

void attention_backward_gated(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dz, Tensor& dw, const Tensor& dy,
                              const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                              const Tensor& ungated, const Tensor& lse, const cpu::OutputGate& gate,
                              const Tensor& q_positions, const Tensor& k_positions, double scale, bool causal,
                              const S2Pattern& s2, Stream& s, AttentionKernel kernel, cpu::MaskForm form) {
  const char* op = "attention_backward_gated";
  detail::AttentionMask mask;
  detail::AttentionDims n = check_inputs(q, k, v, q_positions, k_positions, scale, causal, s2, s, op, mask);
  LOOM_CHECK(gate.defined()) << op << ": the gate has neither z nor w";
  check_gate(gate, n, q.dtype(), s, op);
  check_like(dy, q.shape(), q.dtype(), s, op, "dy");
  check_like(y, q.shape(), q.dtype(), s, op, "y");
  if (gate.z.defined()) check_like(dz, gate.z.shape(), q.dtype(), s, op, "dz");
  if (gate.w.defined()) check_like(dw, gate.w.shape(), q.dtype(), s, op, "dw");
  if (dlse.defined()) check_like(dlse, {n.B, n.H, n.T}, DType::f32, s, op, "dlse");
  detail::AttentionGate g = raw_gate(gate);
  cudaStream_t stream = static_cast<cudaStream_t>(s.handle());
  Tensor dout = Tensor::empty(q.shape(), q.dtype(), q.device());  // gate * dy
  void* dz_ptr = gate.z.defined() ? dz.raw_data() : nullptr;
  if (ungated.defined()) {  // o kept: the pre-pass, then the plain backward on dout and o
    check_like(ungated, q.shape(), q.dtype(), s, op, "ungated");
    g.ungated = ungated.raw_data();  // read
    detail::launch_attention_gate_prepass(q.dtype(), dout.raw_data(), dz_ptr,
                                          gate.w.defined() ? dw.raw_data() : nullptr, nullptr, dy.raw_data(),
                                          y.raw_data(), nullptr, g, n, stream);
    return attention_backward(dq, dk, dv, dout, dlse, q, k, v, ungated, lse, q_positions, k_positions, scale, causal,
                              s2, s, kernel, form);
  }
  // The fused forward of the sigmoid gate: y alone, the pre-pass gives delta, the flash backward runs on it.
  LOOM_CHECK(!gate.w.defined() && flash_attention_applies(q, k, v) && aligned16(dq.raw_data()) &&
             aligned16(dk.raw_data()) && aligned16(dv.raw_data()))
      << op << ": without the ungated output only the flash kernels' backward of a sigmoid gate applies";
  Storage delta(static_cast<size_t>(std::max<int64_t>(1, n.B * n.H * n.T)) * sizeof(float), q.device(), &s);
  detail::launch_attention_gate_prepass(q.dtype(), dout.raw_data(), dz_ptr, nullptr, static_cast<float*>(delta.data()),
                                        dy.raw_data(), y.raw_data(), dlse.defined() ? dlse.data<float>() : nullptr, g,
                                        n, stream);
  run_flash_backward(dq, dk, dv, static_cast<float*>(delta.data()), dout.raw_data(), nullptr, q, k, v, nullptr, lse, n,
                     mask, scale, s);
}

}  // namespace loom::cuda
