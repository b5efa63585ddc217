// safetensors files (Hugging Face's format, used for model export):
//   8 bytes     N, the header length, little-endian uint64
//   N bytes     JSON object, UTF-8, padded with spaces so that N % 8 == 0:
//                 {"__metadata__": {"key": "value", ...},          (optional, strings only)
//                  "<name>": {"dtype": "BF16", "shape": [V, C], "data_offsets": [begin, end]}, ...}
//   the rest    the data section: every tensor's bytes, row-major, little-endian;
//               offsets are relative to the start of the data section, and the
//               tensors tile it exactly (no gaps, no overlap, nothing after).
// loom writes tensors in the caller's order, back to back, so a tensor is
// aligned to its element size only when the ones before it keep it so (the
// format does not require alignment; the reader copies).
// dtype names: F64 F32 BF16 F16 I64 I32 U8 (the other safetensors dtypes are
// rejected with a message saying so).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "framework/tensor.h"

namespace loom {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

struct SafetensorsFile {
  NamedTensors tensors;  // CPU tensors in data-section order (for loom's files, the writer's order)
  std::map<std::string, std::string> metadata;
};

// Writes `path` atomically (path + ".tmp", fsync, rename, fsync of the
// directory). Floating tensors are converted to `float_dtype` when given
// (round to nearest even for bf16/f16); nullopt keeps every dtype. Names must
// be unique, non-empty and not "__metadata__". CUDA and non-contiguous
// tensors are copied to contiguous host memory one at a time.
void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata = {},
                       std::optional<DType> float_dtype = std::nullopt);

// Reads and validates a whole file: header length against the file size, the
// header JSON, every dtype name, shape x dtype size against each tensor's
// offsets, offsets within the data section, tiling it without overlap or gap.
// Errors name the file and the tensor.
SafetensorsFile read_safetensors(const std::string& path);

// "F32" for DType::f32, and back (throws on a name loom does not support).
const char* safetensors_dtype_name(DType dtype);
DType dtype_from_safetensors_name(const std::string& name);

}  // namespace loom
