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
  write_file_atomic(result.config_path, hf.dump(2) + "\n");
  return result;
}

}  // namespace loom
