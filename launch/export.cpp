// loom-export <checkpoint_dir> --to <dir> [--dtype bf16|f32]
// Writes <dir>/model.safetensors (Hugging Face Llama parameter names for the
// Llama-like parts) and <dir>/config.json from a training checkpoint.
#include <CLI/CLI.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "framework/checkpoint_io.h"
#include "framework/config.h"
#include "framework/safetensors.h"
#include "launch/trainer/trainer.h"
#include "models/decoder.h"
#include "models/export.h"

namespace {

void export_checkpoint(const std::string& checkpoint, const std::string& out_dir, const std::string& dtype_name) {
  nlohmann::json index = loom::read_checkpoint_index(checkpoint);
  LOOM_CHECK(index.contains("config") && index.contains("state_file"))
      << "checkpoint " << checkpoint << ": index.json has no config/state_file (not a loom-train checkpoint)";
  loom::RunConfig config = loom::load_config_from_string(index.at("config").get<std::string>(),
                                                         checkpoint + "/index.json");
  loom::DecoderLM model(loom::decoder_config_from(config));
  std::string state_file = (std::filesystem::path(checkpoint) / index.at("state_file").get<std::string>()).string();
  loom::StateDict state;
  for (auto& [key, t] : loom::read_tensors_h5(state_file))
    if (key.rfind("model/", 0) == 0) state[key.substr(6)] = t;
  model.load_state_dict(state);

  loom::DType dtype = dtype_name == "bf16" ? loom::DType::bf16 : loom::DType::f32;
  std::filesystem::create_directories(out_dir);
  std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                 {"loom_step", std::to_string(index.at("step").get<int64_t>())},
                                                 {"loom_layers", config.model.layer_types()}};
  loom::write_safetensors(out_dir + "/model.safetensors", loom::export_tensors(model), metadata, dtype);
  nlohmann::json hf = loom::export_config(model.config(), dtype);
  hf["loom_tokenizer"] = "bytes: ids 0-255 are bytes, 256 is end-of-document";
  loom::write_file_atomic(std::filesystem::path(out_dir) / "config.json", hf.dump(2) + "\n");
  std::cout << "exported step " << index.at("step") << " (" << model.num_parameters() << " parameters, "
            << dtype_name << ") to " << out_dir << "/model.safetensors and config.json\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loom-export: checkpoint -> safetensors + config.json"};
  std::string checkpoint, out_dir, dtype = "bf16";
  app.add_option("checkpoint", checkpoint, "checkpoint directory (runs/<name>/checkpoints/step_N)")->required();
  app.add_option("--to", out_dir, "output directory")->required();
  app.add_option("--dtype", dtype, "dtype of floating tensors")->check(CLI::IsMember({"bf16", "f32"}));
  CLI11_PARSE(app, argc, argv);
  try {
    export_checkpoint(checkpoint, out_dir, dtype);
  } catch (const std::exception& e) {
    std::cerr << "loom-export: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
