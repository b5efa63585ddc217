// The layer registry: which mixer each letter of model.layers builds, and
// which FFN a block gets. Adding a layer family = one registration here.
#include "models/decoder.h"
#include "models/lightning_attention.h"
#include "models/moe_ffn.h"
#include "models/softmax_attention.h"
#include "models/swiglu_ffn.h"

namespace loom {

void MixerRegistry::add(char letter, std::string description, MixerFactory factory) {
  LOOM_CHECK(!contains(letter)) << "mixer letter '" << letter << "' registered twice";
  factories_[letter] = {std::move(description), std::move(factory)};
}

std::shared_ptr<Mixer> MixerRegistry::create(char letter, const DecoderConfig& config, int64_t layer) const {
  auto it = factories_.find(letter);
  LOOM_CHECK(it != factories_.end()) << "unknown layer type '" << letter << "' in model.layers \"" << config.layers
                                     << "\" (known: " << letters() << ")";
  return it->second.second(config, layer);
}

std::string MixerRegistry::letters() const {
  std::string s;
  for (const auto& [letter, entry] : factories_) s += letter;
  return s;
}

const MixerRegistry& builtin_mixers() {
  static const MixerRegistry registry = [] {
    MixerRegistry r;
    r.add('S', "softmax attention (MHA/GQA, RoPE; gate, MoH, S2 options)", [](const DecoderConfig& c, int64_t layer) {
      return std::make_shared<SoftmaxAttention>(c, layer);
    });
    r.add('L', "lightning attention (linear, per-head decay)", [](const DecoderConfig& c, int64_t layer) {
      return std::make_shared<LightningAttention>(c, layer);
    });
    return r;
  }();
  return registry;
}

std::shared_ptr<FeedForward> create_ffn(const DecoderConfig& config, int64_t layer) {
  if (config.ffn == "dense") return std::make_shared<SwiGluFFN>(config, layer);
  if (config.ffn == "moe") return std::make_shared<MoeFFN>(config, layer);
  LOOM_FAIL() << "model.ffn = \"" << config.ffn << "\" is not available (known: dense, moe)";
}

}  // namespace loom
