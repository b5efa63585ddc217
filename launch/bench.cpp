// loom-bench [--json out.json] [--reps N] [--families gemm,memory,optimizer,attention,mixer] [--seq T]
//            [--rows TEXT] [--data const|normal]
// Times the CUDA kernels at the shapes of the recipes (launch/recipes: d 128,
// 4 heads, F 384, byte vocab, 8 x 128 tokens) and of a 1.3B model (d 2048,
// 16 heads of 128, SwiGLU F 5632, vocab 32000, 16K tokens per step), one
// table per kernel family: median of --reps timings (CUDA events) after
// warm-up, the bytes each kernel must move, GB/s and the fraction of the
// device-to-device copy bandwidth measured in the same run; GEMMs in TFLOP/s
// and as a fraction of the H100's 989 TFLOP/s dense bf16 peak. --json writes
// the rows for tools/bench_torch.py, which times the same shapes with PyTorch
// and prints the ratios. Without a GPU it says so and exits 0.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "framework/autograd.h"
#include "framework/ops.h"
#include "framework/error.h"
#include "framework/storage.h"
#include "framework/random.h"
#include "framework/stream.h"
#include "framework/tensor.h"

#ifdef LOOM_WITH_CUDA
#include "kernels/cpu/s2_pattern.h"
#include "kernels/cuda/activation.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/grad_norm.h"
#include "kernels/cuda/reduce.h"
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/rope.h"
#include "kernels/cuda/softmax.h"
#include "models/softmax_attention.h"
#endif

namespace {

using namespace loom;

constexpr double kPeakTflops = 989.0;  // H100 SXM dense bf16 (PERF.md: the MFU denominator)

struct ModelShape {
  std::string name;
  int64_t tokens, d, heads, kv_heads, head_dim, ffn, vocab;
};
const ModelShape kModels[] = {{"recipe", 8 * 128, 128, 4, 2, 32, 384, 256},
                              {"1.3B", 16384, 2048, 16, 16, 128, 5632, 32000}};

struct Row {
  std::string family, name, shape;
  double ms = 0, bytes = 0, flops = 0;
};

class Bench {
 public:
  // `rows`: time only the rows whose name contains it (empty: all).
  Bench(Stream& s, int reps, std::string rows) : s_(s), reps_(reps), rows_filter_(std::move(rows)) {}

  // Median time in ms of fn() over reps_ runs after 3 warm-ups.
  double time_ms(const std::function<void()>& fn) {
    for (int i = 0; i < 3; ++i) fn();
    Event start(s_.device()), stop(s_.device());
    std::vector<float> ms;
    for (int i = 0; i < reps_; ++i) {
      start.record(s_);
      fn();
      stop.record(s_);
      stop.synchronize();
      ms.push_back(start.elapsed_ms(stop));
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }

  void memory(const std::string& family, const std::string& name, const std::string& shape, double bytes,
              const std::function<void()>& fn) {
    if (!selected(name)) return;
    rows_.push_back({family, name, shape, time_ms(fn), bytes, 0});
  }
  void compute(const std::string& family, const std::string& name, const std::string& shape, double flops,
               const std::function<void()>& fn) {
    if (!selected(name)) return;
    rows_.push_back({family, name, shape, time_ms(fn), 0, flops});
  }
  bool selected(const std::string& name) const {
    return rows_filter_.empty() || name.find(rows_filter_) != std::string::npos;
  }

  void print(double copy_gbps) const {
    std::string family;
    for (const Row& r : rows_) {
      if (r.family != family) {
        family = r.family;
        std::printf("\n== %s ==\n", family.c_str());
        if (r.flops > 0) std::printf("%-28s %-30s %10s %10s %8s\n", "kernel", "shape", "ms", "TFLOP/s", "of peak");
        else std::printf("%-28s %-30s %10s %10s %8s\n", "kernel", "shape", "ms", "GB/s", "of copy");
      }
      if (r.flops > 0) {
        double tflops = r.flops / (r.ms * 1e-3) / 1e12;
        std::printf("%-28s %-30s %10.4f %10.1f %7.1f%%\n", r.name.c_str(), r.shape.c_str(), r.ms, tflops,
                    100.0 * tflops / kPeakTflops);
      } else {
        double gbps = r.bytes / (r.ms * 1e-3) / 1e9;
        std::printf("%-28s %-30s %10.4f %10.1f %7.1f%%\n", r.name.c_str(), r.shape.c_str(), r.ms, gbps,
                    100.0 * gbps / copy_gbps);
      }
    }
  }

  nlohmann::json json(double copy_gbps) const {
    nlohmann::json rows = nlohmann::json::array();
    for (const Row& r : rows_)
      rows.push_back({{"family", r.family}, {"name", r.name}, {"shape", r.shape}, {"ms", r.ms}, {"bytes", r.bytes},
                      {"flops", r.flops}});
    return {{"copy_gbps", copy_gbps}, {"rows", rows}};
  }

  Stream& stream() { return s_; }

 private:
  Stream& s_;
  int reps_;
  std::string rows_filter_;
  std::vector<Row> rows_;
};

#ifdef LOOM_WITH_CUDA

std::string dims(std::initializer_list<int64_t> d) {
  std::string out;
  for (int64_t v : d) out += (out.empty() ? "" : "x") + std::to_string(v);
  return out;
}

Device gpu() { return Device::cuda(0); }

Tensor filled(const Shape& shape, DType dtype, double value, Stream& s) {
  Tensor t = Tensor::empty(shape, dtype, gpu());
  cuda::fill(t, value, s);
  return t;
}

// An attention input (B, T, H, D) in bf16: 0.1 everywhere, or with `normal` standard normal values
// (Philox, seed `seed`) drawn on the host for the first kPeriod positions and repeated along T
// (host fills of 128K x 16 x 128 values would take longer than the timings).
Tensor attention_input(const Shape& shape, bool normal, uint64_t seed, Stream& s) {
  if (!normal) return filled(shape, DType::bf16, 0.1, s);
  constexpr int64_t kPeriod = 2048;
  const int64_t T = shape[1], period = std::min(T, kPeriod);
  Tensor block = Tensor::empty({shape[0], period, shape[2], shape[3]}, DType::f32);
  fill_normal(block, 0.0, 1.0, seed, 0);
  block = block.to(DType::bf16).to(gpu());
  Tensor t = Tensor::empty(shape, DType::bf16, gpu());
  for (int64_t t0 = 0; t0 < T; t0 += period) {
    const int64_t n = std::min(period, T - t0);
    t.narrow(1, t0, n).copy_(block.narrow(1, 0, n));
  }
  return t;
}

// Device-to-device copy bandwidth (bytes read + written), 1 GiB.
double copy_bandwidth(Bench& b) {
  const size_t bytes = size_t{1} << 30;
  Storage src(bytes, gpu(), &b.stream()), dst(bytes, gpu(), &b.stream());
  double ms = b.time_ms([&] { copy_bytes(dst.data(), gpu(), src.data(), gpu(), bytes, &b.stream()); });
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
}

void bench_memory_bound(Bench& b, const ModelShape& m) {
  Stream& s = b.stream();
  const DType bf = DType::bf16;
  const int64_t n = m.tokens, c = m.d, f = m.ffn;
  const std::string tag = m.name + " ";
  // Element-wise and casts.
  {
    Tensor x = filled({n, c}, bf, 0.5, s), y = filled({n, c}, bf, 0.25, s), out = filled({n, c}, bf, 0, s);
    Tensor x32 = filled({n, c}, DType::f32, 0.5, s);
    double e = static_cast<double>(n * c);
    b.memory("elementwise", tag + "add bf16", dims({n, c}), 6 * e,
             [&] { cuda::binary(out, x, y, cuda::BinaryOp::add, s); });
    b.memory("elementwise", tag + "cast f32->bf16", dims({n, c}), 6 * e, [&] { cuda::copy_cast(out, x32, s); });
    Tensor row = filled({1, c}, bf, 2.0, s);
    b.memory("elementwise", tag + "mul by a row (broadcast)", dims({n, c}), 4 * e,
             [&] { cuda::binary(out, x, row, cuda::BinaryOp::mul, s); });
    Tensor g32 = filled({n, c}, DType::f32, 0, s);
    b.memory("elementwise", tag + "axpy f32 += bf16", dims({n, c}), 10 * e, [&] { cuda::axpy(g32, x, 0.5, s); });
    Tensor colsum = filled({c}, DType::f32, 0, s);
    b.memory("reduce", tag + "sum_dim 0 -> f32", dims({n, c}), 2 * e, [&] { cuda::sum_dim(colsum, x, 0, s); });
    Tensor total = filled({}, DType::f32, 0, s);
    b.memory("reduce", tag + "sum_all -> f32", dims({n, c}), 2 * e, [&] { cuda::sum_all(total, x, s); });
  }
  // Norm, activation, RoPE, embedding.
  {
    Tensor x = filled({n, c}, bf, 0.5, s), w = filled({c}, bf, 1.0, s), y = filled({n, c}, bf, 0, s);
    Tensor rstd = filled({n}, DType::f32, 0, s), dx = filled({n, c}, bf, 0, s), dw = filled({c}, DType::f32, 0, s);
    double e = static_cast<double>(n * c);
    b.memory("rmsnorm", tag + "forward", dims({n, c}), 4 * e, [&] { cuda::rmsnorm_forward(y, rstd, x, w, 1e-5, s); });
    b.memory("rmsnorm", tag + "backward", dims({n, c}), 6 * e,
             [&] { cuda::rmsnorm_backward(dx, dw, y, x, w, rstd, s); });
    Tensor gate = filled({n, f}, bf, 0.5, s), up = filled({n, f}, bf, 0.5, s), o = filled({n, f}, bf, 0, s);
    Tensor dg = filled({n, f}, bf, 0, s), du = filled({n, f}, bf, 0, s);
    double ef = static_cast<double>(n * f);
    b.memory("activation", tag + "swiglu forward", dims({n, f}), 6 * ef, [&] { cuda::swiglu_forward(o, gate, up, s); });
    b.memory("activation", tag + "swiglu backward", dims({n, f}), 10 * ef,
             [&] { cuda::swiglu_backward(dg, du, o, gate, up, s); });
    b.memory("activation", tag + "silu forward", dims({n, f}), 4 * ef, [&] { cuda::silu_forward(o, gate, s); });
    Tensor q = filled({1, n, m.heads, m.head_dim}, bf, 0.5, s), qr = filled({1, n, m.heads, m.head_dim}, bf, 0, s);
    Tensor pos = Tensor::arange(n, DType::i64).to(gpu());
    b.memory("rope", tag + "forward", dims({1, n, m.heads, m.head_dim}), 4.0 * n * m.heads * m.head_dim,
             [&] { cuda::rope_forward(qr, q, pos, 10000.0, s); });
    Tensor table = filled({m.vocab, c}, bf, 0.1, s);
    Tensor wrapped = Tensor::from_vector<int64_t>([&] {
                       std::vector<int64_t> v(n);
                       for (int64_t i = 0; i < n; ++i) v[i] = (i * 7919) % m.vocab;
                       return v;
                     }(), {n}).to(gpu());
    Tensor emb = filled({n, c}, bf, 0, s);
    b.memory("embedding", tag + "forward", dims({n, c}), 4 * e, [&] { cuda::embedding_forward(emb, table, wrapped, s); });
  }
  // Softmax (attention-probability shaped rows) and the fused cross-entropy.
  {
    const int64_t rows = m.name == "recipe" ? 4096 : 16384, cols = m.name == "recipe" ? 128 : 4096;
    Tensor x = filled({rows, cols}, bf, 0.5, s), y = filled({rows, cols}, bf, 0, s), dx = filled({rows, cols}, bf, 0, s);
    double e = static_cast<double>(rows * cols);
    b.memory("softmax", tag + "forward", dims({rows, cols}), 4 * e, [&] { cuda::softmax_forward(y, x, s); });
    b.memory("softmax", tag + "backward", dims({rows, cols}), 6 * e, [&] { cuda::softmax_backward(dx, x, y, s); });
    const int64_t ce_rows = std::min<int64_t>(n, 8192);
    Tensor logits = filled({ce_rows, m.vocab}, bf, 0.5, s), dlogits = filled({ce_rows, m.vocab}, bf, 0, s);
    Tensor targets = Tensor::from_vector<int64_t>([&] {
                       std::vector<int64_t> v(ce_rows);
                       for (int64_t i = 0; i < ce_rows; ++i) v[i] = (i * 31) % m.vocab;
                       return v;
                     }(), {ce_rows}).to(gpu());
    Tensor loss = filled({}, DType::f32, 0, s), lse = filled({ce_rows}, DType::f32, 0, s);
    Tensor dloss = filled({}, DType::f32, 1.0, s);
    double ev = static_cast<double>(ce_rows * m.vocab);
    b.memory("cross_entropy", tag + "forward (incl. 1 sync)", dims({ce_rows, m.vocab}), 2 * ev,
             [&] { cuda::cross_entropy_forward(loss, lse, logits, targets, -100, true, s); });
    b.memory("cross_entropy", tag + "backward (incl. 1 sync)", dims({ce_rows, m.vocab}), 4 * ev,
             [&] { cuda::cross_entropy_backward(dlogits, dloss, logits, targets, lse, -100, true, s); });
  }
}

// Softmax attention at the issue-7 shapes (B 1, H 16, D 128, bf16, causal):
// the flash kernels and cuDNN's fused attention (kernels/cuda/cudnn_attention.h)
// at T = 4K, 16K, 32K, 128K and the interim kernels at 4K, 16K (the in-run baseline; tools/bench_torch.py adds PyTorch SDPA with its flash
// and cuDNN backends), forward and forward + backward; then S2 (block 64, 16
// local blocks, vert_stride 8) against dense flash at 32K and 128K. FLOPs by
// the usual convention: forward 4 D per visible (query, key) pair per head,
// backward 2.5x the forward (the fused flash backward does those 5 products
// per tile pair, the deterministic one, "flash det", 7: see kernels/NOTES.md);
// S2 rows count the dense pairs, so
// their TFLOP/s over dense's is the speedup. "flash moh rows" is the MoH row
// packing measurement: 3/4 of the queries (every fourth position dropped, as a
// head with 75% of the tokens routed to it sees) against all keys, counted as
// dense too. The "gate" and "moh" rows run the gated calls the S mixer makes
// (cuda::attention_forward_gated / attention_backward_gated): the sigmoid gate
// (headwise: one z per (token, head); elementwise: one per output) or MoH's
// head weights w (one per (token, head), a third of them 0), counted as the
// plain rows: their time over the plain row of their kernel is the epilogue's
// overhead as PERF.md counts it (the gate's projection and MoH's router are not
// in it: --families mixer times the whole layer). On the flash rows the gate is
// in the forward's epilogue and its gradient in the backward's pre-pass; cuDNN
// runs the plain attention and the gate kernels beside it.
// `only_t`: run only the shapes of that sequence length (0: all). `normal` (the default): q, k, v
// and dout standard normal (scores of unit variance at scale D^-1/2), as tools/bench_torch.py
// times SDPA; otherwise 0.1 everywhere (every score equal), which the tables before session 16
// used: at 128K cuDNN's dense kernel took 23% longer on normal inputs than on those, loom's S2
// kernels 9-10% longer (kernels/NOTES.md), so the two fills give different ratios.
void bench_attention(Bench& b, int64_t only_t, bool normal) {
  Stream& s = b.stream();
  const DType bf = DType::bf16;
  const int64_t H = 16, D = 128;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  struct Run {
    const char* label;
    cuda::AttentionKernel kernel;
    int64_t T;
    bool s2;
    bool deterministic = false;  // the two-kernel flash backward (train.deterministic)
    bool packed = false;         // queries: 3/4 of the positions (MoH row packing)
    int64_t gate_span = 0;       // > 0: the S mixer's sigmoid gate, one z per gate_span outputs (D or 1)
    bool moh = false;            // MoH's head weights w as the gate
  };
  const Run runs[] = {{"flash", cuda::AttentionKernel::flash, 4096, false},
                      {"flash", cuda::AttentionKernel::flash, 16384, false},
                      {"flash", cuda::AttentionKernel::flash, 32768, false},
                      {"flash det", cuda::AttentionKernel::flash, 16384, false, true},
                      {"flash det", cuda::AttentionKernel::flash, 32768, false, true},
                      {"cudnn", cuda::AttentionKernel::cudnn, 4096, false},
                      {"cudnn", cuda::AttentionKernel::cudnn, 16384, false},
                      {"cudnn", cuda::AttentionKernel::cudnn, 32768, false},
                      {"cudnn gate headwise", cuda::AttentionKernel::cudnn, 16384, false, false, false, D},
                      {"cudnn gate headwise", cuda::AttentionKernel::cudnn, 32768, false, false, false, D},
                      {"cudnn gate elementwise", cuda::AttentionKernel::cudnn, 16384, false, false, false, 1},
                      {"cudnn gate elementwise", cuda::AttentionKernel::cudnn, 32768, false, false, false, 1},
                      {"cudnn moh weights", cuda::AttentionKernel::cudnn, 16384, false, false, false, 0, true},
                      {"cudnn moh weights", cuda::AttentionKernel::cudnn, 32768, false, false, false, 0, true},
                      {"flash gate headwise", cuda::AttentionKernel::flash, 16384, false, false, false, D},
                      {"flash gate headwise", cuda::AttentionKernel::flash, 32768, false, false, false, D},
                      {"flash gate elementwise", cuda::AttentionKernel::flash, 16384, false, false, false, 1},
                      {"flash gate elementwise", cuda::AttentionKernel::flash, 32768, false, false, false, 1},
                      {"flash moh weights", cuda::AttentionKernel::flash, 16384, false, false, false, 0, true},
                      {"flash moh weights", cuda::AttentionKernel::flash, 32768, false, false, false, 0, true},
                      {"interim", cuda::AttentionKernel::interim, 4096, false},
                      {"interim", cuda::AttentionKernel::interim, 16384, false},
                      {"flash moh rows", cuda::AttentionKernel::flash, 16384, false, false, true},
                      {"flash moh rows", cuda::AttentionKernel::flash, 32768, false, false, true},
                      {"flash s2", cuda::AttentionKernel::flash, 32768, true},
                      {"flash", cuda::AttentionKernel::flash, 131072, false},
                      {"cudnn", cuda::AttentionKernel::cudnn, 131072, false},
                      {"flash s2", cuda::AttentionKernel::flash, 131072, true},
                      {"flash s2 gate headwise", cuda::AttentionKernel::flash, 131072, true, false, false, D}};
  for (const Run& r : runs) {
    if (only_t > 0 && r.T != only_t) continue;
    const std::string label = r.label;
    if (!b.selected(label + " fwd") && !b.selected(label + " fwd+bwd")) continue;  // --rows: no setup either
    const int64_t Tq = r.packed ? r.T - r.T / 4 : r.T;
    const Shape shape{1, r.T, H, D}, q_shape{1, Tq, H, D};
    Tensor q = attention_input(q_shape, normal, 1, s), k = attention_input(shape, normal, 2, s);
    Tensor v = attention_input(shape, normal, 3, s), dout = attention_input(q_shape, normal, 4, s);
    Tensor out = filled(q_shape, bf, 0, s);
    Tensor dq = filled(q_shape, bf, 0, s), dk = filled(shape, bf, 0, s), dv = filled(shape, bf, 0, s);
    Tensor lse = filled({1, H, Tq}, DType::f32, 0, s);
    Tensor pos = Tensor::arange(r.T).to(gpu());
    Tensor q_pos = pos;
    cpu::MaskForm form = cpu::MaskForm::diagonal(0);
    if (r.packed) {
      std::vector<int64_t> kept;
      for (int64_t i = 0; i < r.T; ++i)
        if (i % 4 != 3) kept.push_back(i);
      q_pos = Tensor::from_vector(kept, {Tq}).to(gpu());
      form = cpu::MaskForm::positions();
    }
    const S2Pattern s2 = r.s2 ? S2Pattern{64, 16, 8} : S2Pattern{};
    const double pairs = 0.5 * static_cast<double>(r.T) * static_cast<double>(r.T + 1);
    const double fwd_flops = 4.0 * static_cast<double>(D * H) * pairs;
    const std::string shape_text = "1x" + std::to_string(r.T) + "x16x128 causal";
    // Gate rows: the gated calls (y = o * gate), the gate's gradient into dz, dw.
    cpu::OutputGate gate;
    Tensor ungated, dz, dw;
    if (r.gate_span > 0) {
      gate.z = filled(r.gate_span == 1 ? q_shape : Shape{1, Tq, H}, bf, 0.3, s);
      dz = filled(gate.z.shape(), bf, 0, s);
    }
    if (r.moh) {  // a third of the weights 0 (unrouted), the rest 1.5
      std::vector<float> w(static_cast<size_t>(Tq * H), 1.5f);
      for (size_t i = 0; i < w.size(); i += 3) w[i] = 0.f;
      gate.w = Tensor::from_vector(w, {1, Tq, H}).to(bf).to(gpu());
      dw = filled(gate.w.shape(), bf, 0, s);
    }
    auto forward = [&] {
      if (gate.defined())
        cuda::attention_forward_gated(out, ungated, lse, q, k, v, gate, q_pos, pos, scale, true, s2, s, r.kernel, form);
      else
        cuda::attention_forward(out, lse, q, k, v, q_pos, pos, scale, true, s2, s, r.kernel, form);
    };
    b.compute("attention", label + " fwd", shape_text, fwd_flops, forward);
    cuda::set_deterministic_attention(r.deterministic);
    b.compute("attention", label + " fwd+bwd", shape_text, 3.5 * fwd_flops, [&] {
      forward();
      if (gate.defined())
        cuda::attention_backward_gated(dq, dk, dv, dz, dw, dout, Tensor(), q, k, v, out, ungated, lse, gate, q_pos,
                                       pos, scale, true, s2, s, r.kernel, form);
      else
        cuda::attention_backward(dq, dk, dv, dout, Tensor(), q, k, v, out, lse, q_pos, pos, scale, true, s2, s,
                                 r.kernel, form);
    });
    cuda::set_deterministic_attention(false);
  }
}

// The whole S mixer (projections, RoPE, attention, gate or MoH scaling,
// o_proj) forward + backward through autograd, plain against its gated and MoH
// variants: the overhead of the gate and the MoH routing over plain attention.
// B 1, T `only_t` (16K by default), d 2048, H 16, D 128, bf16.
void bench_mixer(Bench& b, int64_t only_t) {
  const int64_t T = only_t > 0 ? only_t : 16384;
  DecoderConfig c;
  c.d_model = 2048;
  c.n_heads = c.n_kv_heads = 16;
  c.head_dim = 128;
  c.n_layers = 1;
  c.max_seq_len = T;
  struct Variant {
    const char* name;
    std::string gate = "none", heads = "dense";
  };
  const Variant variants[] = {{"plain"}, {"gate headwise", "headwise"}, {"gate elementwise", "elementwise"},
                              {"moh 4+8 of 16", "none", "moh"}};
  const double attention_flops = 4.0 * 128 * 16 * 0.5 * static_cast<double>(T) * static_cast<double>(T + 1);
  const double proj_flops = 2.0 * static_cast<double>(T) * 2048 * (4 * 2048);
  for (const Variant& v : variants) {
    const std::string name = std::string("S ") + v.name + " fwd+bwd";
    if (!b.selected(name)) continue;  // --rows: no setup either
    c.softmax.gate = v.gate;
    c.softmax.heads = v.heads;
    c.softmax.moh.shared = 4;  // MoH: 4 shared + top-8 of 12 routed = 75% of the heads active
    c.softmax.moh.topk = 8;
    SoftmaxAttention mixer(c, 0);
    mixer.initialize(1, 0.02, 1);
    mixer.to(gpu());
    mixer.to(DType::bf16);
    Tensor x = filled({1, T, 2048}, DType::bf16, 0.1, b.stream());
    Tensor r = filled({1, T, 2048}, DType::bf16, 0.01, b.stream());
    Tensor pos = Tensor::arange(T, DType::i64).to(gpu());
    b.compute("mixer", name, "1x" + std::to_string(T) + " d2048 16x128",
              3.0 * proj_flops + 3.5 * attention_flops, [&] {
                SequenceContext ctx;
                ctx.positions = pos;
                Variable xv(x, true);
                Variable loss = sum(mul(mixer.forward(xv, ctx), Variable(r)));
                for (const Variable& aux : ctx.aux_losses) loss = add(loss, aux);
                loss.backward();
                mixer.zero_grad();
              });
  }
}

// Parameter list of `layers` blocks of the model plus its embedding (the optimizer's view).
std::vector<Shape> parameter_shapes(const ModelShape& m, int layers) {
  std::vector<Shape> shapes{{m.vocab, m.d}};
  const int64_t qkv = (m.heads + 2 * m.kv_heads) * m.head_dim;
  for (int l = 0; l < layers; ++l) {
    for (Shape sh : {Shape{qkv, m.d}, Shape{m.d, m.heads * m.head_dim}, Shape{m.ffn, m.d}, Shape{m.ffn, m.d},
                     Shape{m.d, m.ffn}, Shape{m.d}, Shape{m.d}})
      shapes.push_back(sh);
  }
  shapes.push_back({m.d});
  return shapes;
}

void bench_optimizer(Bench& b, const ModelShape& m) {
  Stream& s = b.stream();
  const int layers = 4;  // recipe: all its blocks; 1.3B: 4 of its 24 blocks + embedding (~270M parameters)
  std::vector<cuda::AdamWSpan> spans;
  std::vector<Tensor> grads;
  int64_t total = 0;
  for (const Shape& sh : parameter_shapes(m, layers)) {
    cuda::AdamWSpan sp{filled(sh, DType::f32, 0.01, s), filled(sh, DType::f32, 0, s), filled(sh, DType::f32, 0, s),
                       filled(sh, DType::bf16, 0, s), filled(sh, DType::f32, 1e-3, s), sh.size() == 2 ? 0.1 : 0.0};
    total += sp.param.numel();
    grads.push_back(sp.grad);
    spans.push_back(sp);
  }
  cuda::AdamWScalars sc;
  sc.lr = 1e-4;
  sc.step = 10;
  const std::string shape = std::to_string(spans.size()) + " tensors, " + std::to_string(total) + " params";
  b.memory("optimizer", m.name + " adamw (f32 master, bf16 copy)", shape, 30.0 * total,
           [&] { cuda::adamw_step_many(spans, sc, s); });
  Tensor norms = filled({static_cast<int64_t>(grads.size())}, DType::f64, 0, s);
  b.memory("optimizer", m.name + " grad sum of squares", shape, 4.0 * total,
           [&] { cuda::sum_squares_many(norms, grads, s); });
}

// y = x W^T (forward), dX = dY W, dW = dY^T X for each linear layer of the model.
void bench_gemm(Bench& b, const ModelShape& m) {
  Stream& s = b.stream();
  const DType bf = DType::bf16;
  struct Linear {
    std::string name;
    int64_t in, out;
  };
  const int64_t qkv = (m.heads + 2 * m.kv_heads) * m.head_dim;
  const Linear linears[] = {{"qkv", m.d, qkv},        {"o_proj", m.heads * m.head_dim, m.d},
                            {"gate+up", m.d, 2 * m.ffn}, {"down", m.ffn, m.d},
                            {"lm_head", m.d, m.vocab}};
  const int64_t n = m.tokens;
  for (const Linear& l : linears) {
    Tensor x = filled({n, l.in}, bf, 0.01, s), w = filled({l.out, l.in}, bf, 0.01, s);
    Tensor y = filled({n, l.out}, bf, 0, s), dx = filled({n, l.in}, bf, 0, s), dw = filled({l.out, l.in}, bf, 0, s);
    const double flops = 2.0 * n * l.in * l.out;
    const std::string shape = dims({n, l.in, l.out});
    b.compute("gemm", m.name + " " + l.name + " fwd", shape, flops, [&] { cuda::gemm(y, x, w, false, true, 1, 0, s); });
    b.compute("gemm", m.name + " " + l.name + " dx", shape, flops, [&] { cuda::gemm(dx, y, w, false, false, 1, 0, s); });
    b.compute("gemm", m.name + " " + l.name + " dw", shape, flops, [&] { cuda::gemm(dw, y, x, true, false, 1, 0, s); });
  }
}

// True when `family` is in the comma-separated `families` (empty: all).
bool wanted(const std::string& families, const std::string& family) {
  if (families.empty()) return true;
  return ("," + families + ",").find("," + family + ",") != std::string::npos;
}

int run(const std::string& json_path, int reps, const std::string& families, int64_t only_t,
        const std::string& rows, const std::string& data) {
  if (!cuda_is_available()) {
    std::printf("loom-bench: no usable GPU (%s); nothing to time.\n", cuda_unavailable_reason().c_str());
    return 0;
  }
  Stream& s = Stream::default_for(gpu());
  Bench b(s, reps, rows);
  const double copy_gbps = copy_bandwidth(b);
  std::printf("loom-bench: device-to-device copy %.1f GB/s (read + write), median of %d; GEMM peak %.0f TFLOP/s\n",
              copy_gbps, reps, kPeakTflops);
  if (wanted(families, "gemm")) {
    const int64_t big = 8192;
    Tensor a = filled({big, big}, DType::bf16, 0.01, s), c = filled({big, big}, DType::bf16, 0, s);
    b.compute("gemm", "square bf16", dims({big, big, big}), 2.0 * big * big * big,
              [&] { cuda::gemm(c, a, a, false, false, 1, 0, s); });
    for (const ModelShape& m : kModels) bench_gemm(b, m);
  }
  if (wanted(families, "memory"))
    for (const ModelShape& m : kModels) bench_memory_bound(b, m);
  if (wanted(families, "optimizer"))
    for (const ModelShape& m : kModels) bench_optimizer(b, m);
  if (wanted(families, "attention")) bench_attention(b, only_t, data == "normal");
  if (wanted(families, "mixer")) bench_mixer(b, only_t);
  b.print(copy_gbps);
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    LOOM_CHECK(out.good()) << "cannot write " << json_path;
    out << b.json(copy_gbps).dump(1) << "\n";
    std::printf("\nrows written to %s\n", json_path.c_str());
  }
  return 0;
}

#else

int run(const std::string&, int, const std::string&, int64_t, const std::string&, const std::string&) {
  std::printf("loom-bench: built without CUDA (no nvcc at configure time); nothing to time.\n");
  return 0;
}

#endif

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loom-bench: CUDA kernel timings (one table per kernel family)"};
  std::string json_path;
  int reps = 20;
  app.add_option("--json", json_path, "also write the rows as JSON (input of tools/bench_torch.py)");
  app.add_option("--reps", reps, "timed repetitions per kernel (median reported)")->check(CLI::Range(10, 1000));
  std::string families;
  app.add_option("--families", families,
                 "comma-separated groups to time: gemm, memory, optimizer, attention, mixer (default: all)");
  int64_t only_t = 0;
  app.add_option("--seq", only_t, "attention, mixer: time only the shapes of this sequence length (default: all; mixer 16K)")
      ->check(CLI::PositiveNumber);
  std::string rows;
  app.add_option("--rows", rows, "time only the rows whose name contains this text (e.g. 'moh'; default: all)");
  std::string data = "normal";
  app.add_option("--data", data,
                 "attention inputs: normal (standard normal, as tools/bench_torch.py's; default) or const (0.1 "
                 "everywhere: every score equal, the GPU at lower power; the tables before 2026-12-06's session 16)")
      ->check(CLI::IsMember({"const", "normal"}));
  CLI11_PARSE(app, argc, argv);
  try {
    return run(json_path, reps, families, only_t, rows, data);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "loom-bench: %s\n", e.what());
    return 1;
  }
}
