// Decoder LM assembly: config validation, the mixer registry, blocks, loss,
// FLOP accounting and text generation.
#include "models/decoder.h"

#include <algorithm>
#include <cmath>

#include "framework/ops.h"
#include "framework/random.h"

namespace loom {

// ---- config ----
void DecoderConfig::validate() const {
  LOOM_CHECK(vocab_size >= 2) << "model.vocab_size " << vocab_size << " must be >= 2";
  LOOM_CHECK(d_model > 0 && n_layers > 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0 && ffn_hidden > 0)
      << "model sizes must be positive: d_model " << d_model << ", n_layers " << n_layers << ", n_heads " << n_heads
      << ", n_kv_heads " << n_kv_heads << ", head_dim " << head_dim << ", ffn_hidden " << ffn_hidden;
  LOOM_CHECK(n_heads % n_kv_heads == 0) << "model.n_heads " << n_heads << " must be a multiple of model.n_kv_heads "
                                        << n_kv_heads;
  LOOM_CHECK(head_dim % 2 == 0) << "head_dim " << head_dim << " must be even (RoPE pairs channels)";
  LOOM_CHECK(!layers.empty()) << "model.layers must name at least one layer type";
  for (char c : layers)
    LOOM_CHECK(builtin_mixers().contains(c)) << "unknown layer type '" << c << "' in model.layers \"" << layers
                                             << "\" (known: " << builtin_mixers().letters() << ")";
  LOOM_CHECK(norm_eps > 0 && init_std > 0 && rope_theta > 0)
      << "norm_eps " << norm_eps << ", init_std " << init_std << ", rope_theta " << rope_theta << " must be > 0";
}

// ---- block ----
Block::Block(const DecoderConfig& config, int64_t layer) {
  mixer_norm_ = register_module("mixer_norm", std::make_shared<RMSNorm>(config.d_model, config.norm_eps, config.dtype));
  mixer_ = register_module("mixer", builtin_mixers().create(config.layer_type(layer), config, layer));
  ffn_norm_ = register_module("ffn_norm", std::make_shared<RMSNorm>(config.d_model, config.norm_eps, config.dtype));
  ffn_ = register_module("ffn", create_ffn(config, layer));
}

Variable Block::forward(const Variable& x, SequenceContext& ctx) const {
  Variable h = add(x, mixer_->forward(mixer_norm_->forward(x), ctx));  // (B, T, C)
  return add(h, ffn_->forward(ffn_norm_->forward(h), ctx));           // (B, T, C)
}

// ---- model ----
DecoderLM::DecoderLM(const DecoderConfig& config) : config_(config) {
  config_.validate();
  embed_ = register_module("embed", std::make_shared<Embedding>(config.vocab_size, config.d_model, InitSpec{}, config.dtype));
  auto blocks = register_module("blocks", std::make_shared<ModuleList>());
  for (int64_t i = 0; i < config.n_layers; ++i) blocks_.push_back(blocks->append(std::make_shared<Block>(config, i)));
  norm_ = register_module("norm", std::make_shared<RMSNorm>(config.d_model, config.norm_eps, config.dtype));
  if (!config.tie_embeddings)
    lm_head_ = register_module("lm_head", std::make_shared<Linear>(config.d_model, config.vocab_size, false, InitSpec{},
                                                                   config.dtype));
}

Variable DecoderLM::forward(const Tensor& ids, SequenceContext& ctx) const {
  LOOM_CHECK(ids.dim() == 2) << "model input ids must be (B, T), got " << shape_str(ids.shape());
  if (ctx.cp.active()) {
    LOOM_CHECK(ctx.cp.layout && ctx.cp.layout->cp_size() == ctx.cp.comm->size())
        << "sequence parallelism: the context needs the token layout of its cp group of " << ctx.cp.comm->size()
        << " ranks";
    LOOM_CHECK(ids.size(1) == ctx.cp.layout->local_len())
        << "model input ids " << shape_str(ids.shape()) << ": under cp " << ctx.cp.comm->size()
        << " each rank holds seq_len / cp = " << ctx.cp.layout->local_len() << " tokens (seq_len "
        << ctx.cp.layout->seq_len() << ")";
    if (!ctx.positions.defined()) ctx.positions = ctx.cp.layout->positions(ctx.cp.comm->rank());  // (T/P)
  }
  if (!ctx.positions.defined()) ctx.positions = default_positions(ids.size(1));
  Variable h = embed_->forward(ids);  // (B, T, C)
  for (const auto& block : blocks_) {
    if (config_.activation_checkpointing) {
      // Recomputed in backward; layers must be deterministic given their inputs.
      // Auxiliary losses are outputs of the checkpointed region, so they keep
      // their gradient path; statistics come from the first (forward) run.
      std::shared_ptr<Block> b = block;
      Tensor positions = ctx.positions;
      SequenceParallel cp = ctx.cp;  // recomputation repeats the layer's collectives on every rank alike
      std::map<std::string, double>* stats = &ctx.stats;
      std::map<std::string, SequenceContext::DeferredStat>* deferred = &ctx.deferred_stats;
      auto first_run = std::make_shared<bool>(true);
      std::vector<Variable> outs = checkpoint(
          [b, positions, cp, stats, deferred, first_run](const std::vector<Variable>& in) {
            SequenceContext local;
            local.positions = positions;
            local.cp = cp;
            std::vector<Variable> result{b->forward(in[0], local)};
            result.insert(result.end(), local.aux_losses.begin(), local.aux_losses.end());
            if (*first_run) {
              for (const auto& [key, value] : local.stats) (*stats)[key] = value;
              for (const auto& [key, value] : local.deferred_stats) (*deferred)[key] = value;
              *first_run = false;
            }
            return result;
          },
          {h});
      h = outs[0];
      ctx.aux_losses.insert(ctx.aux_losses.end(), outs.begin() + 1, outs.end());
    } else {
      h = block->forward(h, ctx);
    }
  }
  h = norm_->forward(h);
  const Variable& head = lm_head_ ? lm_head_->weight() : embed_->weight();
  return linear(h, head);  // (B, T, V)
}

Variable DecoderLM::loss(const Tensor& ids, const Tensor& targets, SequenceContext& ctx) const {
  LOOM_CHECK(targets.shape() == ids.shape()) << "targets " << shape_str(targets.shape()) << " must match ids "
                                             << shape_str(ids.shape());
  Variable logits = forward(ids, ctx);  // (B, T, V)
  int64_t n = ids.numel();
  Variable total;
  if (ctx.cp.active()) {
    // This rank's share: its tokens' summed loss over the GLOBAL count of
    // non-ignored targets (summed over the cp group), so the shares add up
    // to the mean over the whole sequence.
    double counted = 0;
    for (int64_t id : targets.to_vector<int64_t>()) counted += id != -100 ? 1 : 0;
    Tensor count = Tensor::scalar(counted, DType::f64);
    sum_over_sequence(count, ctx, "loss");
    Variable summed = cross_entropy(reshape(logits, {n, config_.vocab_size}), targets.reshape({n}), -100,
                                    Reduction::sum);
    total = scale(summed, count.item() > 0 ? 1.0 / count.item() : 0.0);
  } else {
    total = cross_entropy(reshape(logits, {n, config_.vocab_size}), targets.reshape({n}));
  }
  for (const Variable& aux : ctx.aux_losses) total = add(total, aux);
  return total;
}

int64_t DecoderLM::active_parameters() const {
  int64_t n = config_.vocab_size * config_.d_model;  // the LM head's product (tied or not)
  for (const auto& block : blocks_) {
    n += block->mixer().num_parameters() + block->ffn().active_parameters();  // matrix products only
  }
  return n;
}

double DecoderLM::training_flops_per_token(int64_t context_length) const {
  double flops = 6.0 * static_cast<double>(active_parameters());
  for (const auto& block : blocks_) flops += 3.0 * block->mixer().extra_forward_flops_per_token(context_length);
  return flops;
}

Tensor default_positions(int64_t length, int64_t offset) {
  Tensor p = Tensor::empty({length}, DType::i64);
  int64_t* data = p.data<int64_t>();
  for (int64_t i = 0; i < length; ++i) data[i] = offset + i;
  return p;
}

std::vector<int64_t> generate(const DecoderLM& model, const std::vector<int64_t>& prompt, int64_t new_tokens,
                              double temperature, uint64_t seed, int64_t max_context) {
  LOOM_CHECK(!prompt.empty()) << "generate: empty prompt";
  NoGradGuard no_grad;
  std::vector<int64_t> tokens = prompt;
  int64_t v = model.config().vocab_size;
  for (int64_t step = 0; step < new_tokens; ++step) {
    int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - max_context);
    std::vector<int64_t> window(tokens.begin() + start, tokens.end());
    int64_t t = static_cast<int64_t>(window.size());
    SequenceContext ctx;
    ctx.positions = default_positions(t);
    Tensor logits = model.forward(Tensor::from_vector<int64_t>(window, {1, t}), ctx).data();  // (1, T, V)
    std::vector<double> last = logits.select(1, t - 1).to_vector<double>();               // (V)
    int64_t next = 0;
    if (temperature <= 0) {
      next = std::max_element(last.begin(), last.end()) - last.begin();
    } else {
      double top = *std::max_element(last.begin(), last.end()), total = 0;
      for (double& x : last) total += (x = std::exp((x - top) / temperature));
      uint32_t words[4];
      philox4x32(seed, static_cast<uint64_t>(step), 0, words);
      double u = uniform_from_bits(words[0]) * total, acc = 0;
      for (next = 0; next < v - 1; ++next) {
        acc += last[next];
        if (acc > u) break;
      }
    }
    tokens.push_back(next);
  }
  return std::vector<int64_t>(tokens.begin() + static_cast<int64_t>(prompt.size()), tokens.end());
}

}  // namespace loom
