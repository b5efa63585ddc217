// Export naming: loom parameter names -> Hugging Face Llama names, and the
// config.json fields of LlamaForCausalLM, so that a softmax-only loom model is
// readable by standard tools. Layers without a Llama counterpart (later mixer
// families) keep documented loom names under "model.layers.{i}.".
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/decoder.h"

namespace loom {

// Maps one loom parameter name to its exported name (throws on unknown names).
std::string export_name(const std::string& loom_name);
// The model's parameters under exported names, in a stable order.
std::vector<std::pair<std::string, Tensor>> export_tensors(const DecoderLM& model);
// config.json for the exported model.
nlohmann::json export_config(const DecoderConfig& config, DType torch_dtype);

}  // namespace loom
