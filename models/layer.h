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

namespace loom {

struct DecoderConfig;

// What a layer needs to know about the tokens it sees, beyond the activations.
struct SequenceContext {
  Tensor positions;  // (T) i64: global position of each local token (RoPE, causal masks)
  // Auxiliary losses (e.g. load balancing) added to the training loss by the
  // model owner, and scalar statistics for metrics.jsonl ("layer3.moe.max_load" ...).
  std::vector<Variable> aux_losses;
  std::map<std::string, double> stats;
};

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
