// Interfaces shared by every layer type of the decoder: the per-forward
// SequenceContext, the Mixer (token mixing: softmax attention, lightning
// attention, ...) and FeedForward (dense SwiGLU, MoE) module kinds, and the
// registry that maps a layer letter of the `layers` pattern to a mixer.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "framework/module.h"
#include "framework/ops.h"
#include "parallel/comm_stats.h"
#include "parallel/sp_collectives.h"
#include "parallel/token_layout.h"

namespace loom {

struct DecoderConfig;
struct SpAttentionStats;  // parallel/sp_attention.h

// Sequence (context) parallelism: the sequence is split over the `comm` group
// as `layout` says; this rank holds layout->chunks(comm->rank()). Inactive
// (comm null or of one rank): every layer runs its single-device math.
struct SequenceParallel {
  std::shared_ptr<const TokenLayout> layout;
  Communicator* comm = nullptr;      // the cp group
  std::string softmax = "ring";      // parallel.cp_softmax for S layers: ring | allgather
  CommStats* stats = nullptr;        // over `comm`: bytes per layer type (null: not counted)
  // S layers' sequence-parallel attention: traffic, work and (CUDA, when asked)
  // ring hop timings added here (null: not counted); must outlive the backward.
  SpAttentionStats* attention_stats = nullptr;

  bool active() const { return comm != nullptr && comm->size() > 1; }
  int size() const { return active() ? comm->size() : 1; }
  // The group for a layer type's traffic ("L", "S", "moe", "loss"), counted when stats are on.
  Communicator& group(const std::string& layer_type) const { return stats ? stats->counted(layer_type) : *comm; }
};

// What a layer needs to know about the tokens it sees, beyond the activations.
// Under cp the training objective is the SUM over the cp ranks of each rank's
// loss share (DecoderLM::loss); a per-token mean statistic (MoE/MoH balance)
// must then be global over the sequence: sum_over_sequence below.
struct SequenceContext {
  Tensor positions;  // (T) i64: global position of each local token (RoPE, causal masks)
  SequenceParallel cp;
  // Auxiliary losses (e.g. load balancing) added to the training loss by the
  // model owner, and scalar statistics for metrics.jsonl ("layer3.moe.max_load" ...):
  // host values in `stats`; values still on the device in `deferred_stats`, read
  // (value.item() * factor) once the step is done, so the forward never waits
  // for the GPU to report one.
  struct DeferredStat {
    Tensor value;  // any device; the statistic is factor times its element `index` (flattened)
    double factor = 1;
    int64_t index = 0;
    // Statistics taken from one tensor share its host copy: the first read fetches it (one wait).
    std::shared_ptr<std::vector<double>> host = std::make_shared<std::vector<double>>();
    double read() const {
      if (host->empty()) *host = value.to_vector<double>();
      return (*host)[static_cast<size_t>(index)] * factor;
    }
  };
  std::vector<Variable> aux_losses;
  std::map<std::string, double> stats;
  std::map<std::string, DeferredStat> deferred_stats;

  // Every statistic by name, deferred ones read now (a host wait on the GPU).
  std::map<std::string, double> all_stats() const {
    std::map<std::string, double> out = stats;
    for (const auto& [name, d] : deferred_stats) out[name] = d.read();
    return out;
  }
  // One statistic by name (a deferred one read now; throws when there is none).
  double stat(const std::string& name) const {
    const auto host = stats.find(name);
    return host != stats.end() ? host->second : deferred_stats.at(name).read();
  }
};

// Routers (MoE experts, MoH heads) choose by comparing their scores, so their
// logits are computed in at least f32 (f64 models keep f64): bf16 logits round
// differences below 2^-8 of their size to ties, which top-k then breaks by index.
inline DType router_dtype(DType compute) { return compute == DType::f64 ? DType::f64 : DType::f32; }
// proj(x) in router_dtype(x's dtype); gradients return in the dtypes of x and the weights.
// Bias-free routers with 16-bit x on CUDA multiply in x's dtype with fp32 accumulation
// and output (linear_wide_out: the same logits without an f32 copy of x).
inline Variable router_logits(const Linear& proj, const Variable& x) {
  const DType d = router_dtype(x.dtype());
  if (!proj.bias().defined()) return linear_wide_out(x, cast(proj.weight(), d));
  return linear(cast(x, d), cast(proj.weight(), d), cast(proj.bias(), d));
}

// Under active cp: the sum over the cp group of this rank's partial `x`
// (differentiable: all-reduce forward and backward, so a value every rank then
// uses in its own share back-propagates to all ranks' tokens); else x.
inline Variable sum_over_sequence(const Variable& x, const SequenceContext& ctx, const std::string& layer_type) {
  return ctx.cp.active() ? sp::all_reduce_sum(x, ctx.cp.group(layer_type)) : x;
}
// The same for a constant (counts, loads): a plain all-reduce (sum) in place.
inline void sum_over_sequence(Tensor& x, const SequenceContext& ctx, const std::string& layer_type) {
  if (ctx.cp.active()) ctx.cp.group(layer_type).all_reduce(x, ReduceOp::sum, Stream::default_for(x.device()));
}

class Mixer : public Module {
 public:
  // x (B, T, C) -> (B, T, C)
  virtual Variable forward(const Variable& x, SequenceContext& ctx) const = 0;
  // Model FLOPs per token of this layer beyond its matrix products (attention
  // scores/state), for MFU (ALGORITHMS.md §11), forward only.
  virtual double extra_forward_flops_per_token(int64_t context_length) const = 0;
};

class FeedForward : public Module {
 public:
  // x (B, T, C) -> (B, T, C)
  virtual Variable forward(const Variable& x, SequenceContext& ctx) const = 0;
  // Parameters active per token (MoE: only the routed experts), for MFU.
  virtual int64_t active_parameters() const = 0;
};

using MixerFactory = std::function<std::shared_ptr<Mixer>(const DecoderConfig& config, int64_t layer)>;

// Layer letters ('S', later 'L', ...) -> factories. Registered once at start-up
// by register_builtin_mixers(); later mixer families add their letter there.
class MixerRegistry {
 public:
  void add(char letter, std::string description, MixerFactory factory);
  std::shared_ptr<Mixer> create(char letter, const DecoderConfig& config, int64_t layer) const;
  bool contains(char letter) const { return factories_.count(letter) != 0; }
  std::string letters() const;  // e.g. "S" — for error messages

 private:
  std::map<char, std::pair<std::string, MixerFactory>> factories_;
};

// The registry with every built-in mixer (models/registry.cpp).
const MixerRegistry& builtin_mixers();
// The FFN of a block, by config.ffn (dense SwiGLU, MoE).
std::shared_ptr<FeedForward> create_ffn(const DecoderConfig& config, int64_t layer);

}  // namespace loom
