// The decoder LM of DESIGN.md §4: embedding -> N blocks -> final RMSNorm ->
// LM head (tied to the embedding or not). A block is pre-norm mixer + residual,
// pre-norm FFN + residual; the mixer of block i is chosen by the letter
// layers[i % len(layers)] of the pattern string.
//
// Parameter names (stable; export maps them to Hugging Face Llama names):
//   embed.weight                              (V, C)
//   blocks.{i}.mixer_norm.weight              (C)
//   blocks.{i}.mixer.{q,k,v,o}_proj.weight    S mixer: (H*D, C), (Hkv*D, C) x2, (C, H*D)
//   blocks.{i}.mixer.gate_proj.weight         S with gate: (H, C) headwise or (H*D, C) elementwise
//   blocks.{i}.mixer.router_proj.weight       S with MoH: (H - h_s, C); shared_router_proj (h_s, C)
//                                             when h_s > 1; mix_proj (2, C) when h_s > 0
//   (L mixer and MoE FFN: see models/lightning_attention.h and models/moe_ffn.h)
//   blocks.{i}.ffn_norm.weight                (C)
//   blocks.{i}.ffn.{gate,up,down}_proj.weight (F, C), (F, C), (C, F)
//   norm.weight                               (C)
//   lm_head.weight                            (V, C), only when embeddings are untied
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "framework/config.h"
#include "models/layer.h"

namespace loom {

struct DecoderConfig {
  int64_t vocab_size = 257;
  int64_t d_model = 128;    // C
  int64_t n_layers = 4;     // L
  int64_t n_heads = 4;      // H
  int64_t n_kv_heads = 4;   // Hkv (H % Hkv == 0)
  int64_t head_dim = 32;    // D
  int64_t ffn_hidden = 384; // F
  std::string layers = "S";
  double rope_theta = 10000.0;
  int64_t max_seq_len = 2048;  // longest context (export's max_position_embeddings)
  double norm_eps = 1e-5;
  bool tie_embeddings = true;
  double init_std = 0.02;
  bool activation_checkpointing = false;
  DType dtype = DType::f32;
  std::string ffn = "dense";   // dense | moe
  SoftmaxOptions softmax;      // options of S layers (gate, MoH, S2)
  LightningOptions lightning;  // options of L layers
  MoeOptions moe;              // options of the MoE FFN

  // Throws naming the values when the combination is invalid.
  void validate() const;
  char layer_type(int64_t layer) const { return layers[static_cast<size_t>(layer) % layers.size()]; }
};

class Block : public Module {
 public:
  Block(const DecoderConfig& config, int64_t layer);
  // x (B, T, C) -> (B, T, C)
  Variable forward(const Variable& x, SequenceContext& ctx) const;
  const Mixer& mixer() const { return *mixer_; }
  const FeedForward& ffn() const { return *ffn_; }

 private:
  std::shared_ptr<RMSNorm> mixer_norm_, ffn_norm_;
  std::shared_ptr<Mixer> mixer_;
  std::shared_ptr<FeedForward> ffn_;
};

class DecoderLM : public Module {
 public:
  explicit DecoderLM(const DecoderConfig& config);
  // ids (B, T) integer, ctx.positions (T) -> logits (B, T, V)
  Variable forward(const Tensor& ids, SequenceContext& ctx) const;
  // Mean cross-entropy of next-token prediction plus the auxiliary losses the
  // layers added to ctx; targets (B, T) integer with -100 = ignore. Under
  // active cp (ctx.cp) ids and targets are this rank's shard (targets shifted
  // before sharding) and the result is this rank's SHARE: summed over the cp
  // group it is the loss of the whole sequence (mean over the global count of
  // non-ignored targets, aux losses global over the sequence), and so are the
  // parameter gradients.
  Variable loss(const Tensor& ids, const Tensor& targets, SequenceContext& ctx) const;
  const DecoderConfig& config() const { return config_; }
  const std::vector<std::shared_ptr<Block>>& blocks() const { return blocks_; }
  // Model FLOPs per token for training (6 * active params + attention terms), ALGORITHMS.md §11.
  double training_flops_per_token(int64_t context_length) const;
  int64_t active_parameters() const;

 private:
  DecoderConfig config_;
  std::shared_ptr<Embedding> embed_;
  std::vector<std::shared_ptr<Block>> blocks_;
  std::shared_ptr<RMSNorm> norm_;
  std::shared_ptr<Linear> lm_head_;  // null when tied
};

// Positions 0..T-1 plus `offset`, as an i64 (T) tensor.
Tensor default_positions(int64_t length, int64_t offset = 0);

// Continues `prompt` by `new_tokens` tokens: greedy when temperature <= 0, else
// sampled with the counter-based RNG from `seed` (same result on every rank).
std::vector<int64_t> generate(const DecoderLM& model, const std::vector<int64_t>& prompt, int64_t new_tokens,
                              double temperature, uint64_t seed, int64_t max_context);

}  // namespace loom
