// loom-export <checkpoint_dir> --to <dir> [--dtype bf16|f32]
// Writes <dir>/model.safetensors (Hugging Face Llama parameter names for the
// Llama-like parts) and <dir>/config.json from a training checkpoint.
#include <CLI/CLI.hpp>

#include <iostream>

#include "launch/trainer/export_model.h"

int main(int argc, char** argv) {
  CLI::App app{"loom-export: checkpoint -> safetensors + config.json"};
  std::string checkpoint, out_dir, dtype = "bf16";
  app.add_option("checkpoint", checkpoint, "checkpoint directory (runs/<name>/checkpoints/step_N)")->required();
  app.add_option("--to", out_dir, "output directory")->required();
  app.add_option("--dtype", dtype, "dtype of floating tensors (bf16 or f32)")->check(CLI::IsMember({"bf16", "f32"}));
  CLI11_PARSE(app, argc, argv);
  try {
    loom::ExportResult r = loom::export_checkpoint(checkpoint, out_dir, loom::dtype_from_name(dtype));
    std::cout << "exported step " << r.step << " (" << r.parameters << " parameters, " << dtype << ") to "
              << r.safetensors_path << " and " << r.config_path << "\n";
  } catch (const std::exception& e) {
    std::cerr << "loom-export: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
