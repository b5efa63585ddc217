// Checkpoint -> safetensors + config.json (see export_model.h).
#include "launch/trainer/export_model.h"

#include <filesystem>

#include "framework/checkpoint_io.h"
#include "framework/config.h"
#include "framework/safetensors.h"
#include "launch/trainer/trainer.h"
#include "models/decoder.h"
#include "models/export.h"

namespace loom {

ExportResult export_checkpoint(const std::string& checkpoint, const std::string& out_dir, DType dtype) {
  LOOM_CHECK(dtype == DType::bf16 || dtype == DType::f32) << "export dtype " << dtype << " (allowed: bf16, f32)";
  nlohmann::json index = read_checkpoint_index(checkpoint);
  LOOM_CHECK(index.contains("config") && index.contains("state_file"))
      << "checkpoint " << checkpoint << ": index.json has no config/state_file (not a loom-train checkpoint)";
  RunConfig config = load_config_from_string(index.at("config").get<std::string>(), checkpoint + "/index.json");
  DecoderLM model(decoder_config_from(config));
  std::string state_file = (std::filesystem::path(checkpoint) / index.at("state_file").get<std::string>()).string();
  StateDict state;
  for (auto& [key, t] : read_tensors_h5(state_file))
    if (key.rfind("model/", 0) == 0) state[key.substr(6)] = t;
  model.load_state_dict(state);

  ExportResult result;
  result.step = index.at("step").get<int64_t>();
  result.parameters = model.num_parameters();
  std::filesystem::create_directories(out_dir);
  result.safetensors_path = (std::filesystem::path(out_dir) / "model.safetensors").string();
  result.config_path = (std::filesystem::path(out_dir) / "config.json").string();
  std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"loom_step", std::to_string(result.step)}, {"loom_layers", config.model.layer_types()}};
  write_safetensors(result.safetensors_path, export_tensors(model), metadata, dtype);
  nlohmann::json hf = export_config(model.config(), dtype);
  hf["loom_tokenizer"] = "bytes: ids 0-255 are bytes, 256 is end-of-document";
  // Parameters without a Llama counterpart, under their exported names (module path after "loom.").
  nlohmann::json loom_names = nlohmann::json::array();
  for (const auto& [name, tensor] : export_tensors(model))
    if (name.find(".loom.") != std::string::npos) loom_names.push_back({{"name", name}, {"shape", tensor.shape()}});
  hf["loom_parameters"] = loom_names;
  hf["loom_options"] = {{"S", {{"gate", config.model.S.gate}, {"heads", config.model.S.heads},
                               {"moh_shared", config.model.S.moh.shared}, {"moh_topk", config.model.S.moh.topk},
                               {"sparsity", config.model.S.sparsity}, {"s2_block", config.model.S.s2.block},
                               {"s2_local_blocks", config.model.S.s2.local_blocks},
                               {"s2_vert_stride", config.model.S.s2.vert_stride}}},
                        {"L", {{"block", config.model.L.block}, {"qk_activation", config.model.L.qk_activation},
                               {"decay_scale", config.model.L.decay_scale}, {"output_gate", config.model.L.output_gate},
                               {"output_norm", config.model.L.output_norm}}},
                        {"ffn", config.model.ffn},
                        {"moe", {{"experts", config.model.moe.experts}, {"topk", config.model.moe.topk},
                                 {"router", config.model.moe.router},
                                 {"shared_experts", config.model.moe.shared_experts}}}};
  write_file_atomic(result.config_path, hf.dump(2) + "\n");
  return result;
}

}  // namespace loom
