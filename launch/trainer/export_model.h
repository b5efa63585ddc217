// Export of a training checkpoint to model.safetensors + config.json (used by
// loom-export and its round-trip test).
#pragma once

#include <string>

#include "framework/dtype.h"

namespace loom {

struct ExportResult {
  int64_t step = 0;
  int64_t parameters = 0;
  std::string safetensors_path, config_path;
};

// Reads `checkpoint` (a loom-train step directory), rebuilds the model from
// the config stored in its index, and writes `out_dir`/model.safetensors
// (floating tensors as `dtype`) and `out_dir`/config.json.
ExportResult export_checkpoint(const std::string& checkpoint, const std::string& out_dir, DType dtype);

}  // namespace loom
