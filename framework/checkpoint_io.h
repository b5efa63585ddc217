// Checkpoint IO: named tensors in HDF5 files, and checkpoint directories that
// are complete or absent (DESIGN.md §5).
//
// One HDF5 file holds one flat map of tensors: each tensor is a dataset at the
// root named by its key ("blocks.0.mixer.q_proj.weight"; '%' and '/' are
// percent-escaped, because '/' separates HDF5 groups), with its shape (scalars
// as HDF5 scalar dataspaces, zero-sized dimensions allowed) and an attribute
// "loom_dtype". f64, f32, i64, i32 and u8 use the matching HDF5 types, so
// h5py/h5dump read them as they are; bf16 and f16 are stored as their raw
// 16-bit patterns (uint16) and only "loom_dtype" says which. Free-form
// metadata is one JSON string attribute "loom_attributes" on the root group.
// HDF5 is not thread-safe here (serial build): call from one thread at a time.
//
// A checkpoint directory on disk:
//   <root>/step_00000100/            step zero-padded to 8 digits (more when larger)
//       rank_00000000.h5             one file per rank, written by that rank
//       rank_00000001.h5
//       index.json                   written last by rank 0; lists the rank files
//   <root>/step_00000200.tmp/        being written (or left by a killed run)
// The write protocol:
//   rank 0: tmp = begin_checkpoint(root, step)           (creates the tmp dir)
//   all:    barrier; write_tensors_h5(tmp / checkpoint_rank_file(rank), ...); barrier
//   rank 0: write_checkpoint_index(tmp, index); commit_checkpoint(tmp, checkpoint_dir(root, step));
//           prune_checkpoints(root, keep_last)
// Other ranks get the same tmp path from checkpoint_tmp_dir(root, step). On
// resume, rank 0 picks find_latest_checkpoint(root) and broadcasts the step,
// so that all ranks load the same one even on a lagging shared file system.
// commit_checkpoint fsyncs every file and the directory, then renames tmp to
// its final name and fsyncs the root, so a crash leaves either the complete
// step directory or a *.tmp directory that readers ignore. A step directory
// counts only when its index.json parses and every rank file it lists exists.
//
// index.json is the caller's JSON object (config, data position, RNG state,
// world layout, ...) and must contain:
//   "step":       integer, equal to the step in the directory name
//   "rank_files": non-empty array of file names relative to the directory
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "framework/file_io.h"
#include "framework/tensor.h"

namespace loom {

// ---- tensors in one HDF5 file ----

// Writes (truncating) `path`: one dataset per tensor and `attributes` as the
// root JSON attribute; the file is fsynced before returning. Non-contiguous
// and CUDA tensors are copied to contiguous host memory first. Keys must be
// non-empty and every tensor defined.
void write_tensors_h5(const std::string& path, const std::map<std::string, Tensor>& tensors,
                      const nlohmann::json& attributes = nlohmann::json::object());

// Reads every dataset of `path` into CPU tensors (the attribute JSON into
// `*attributes` when given; an empty object when the file has none). Datasets
// without "loom_dtype" get the dtype their HDF5 type maps to. Errors name the
// file, the dataset and what failed (HDF5's own message included).
std::map<std::string, Tensor> read_tensors_h5(const std::string& path, nlohmann::json* attributes = nullptr);

// ---- checkpoint directories ----

// "step_00000100" for step 100 (steps >= 0; zero-padded to 8 digits).
std::string checkpoint_step_name(int64_t step);
// The step in a directory name "step_<digits>" (at least 8 digits); nullopt
// for anything else, "step_00000100.tmp" included.
std::optional<int64_t> parse_checkpoint_step_name(const std::string& name);
// "rank_00000003.h5" for rank 3.
std::string checkpoint_rank_file(int rank);
// <root>/step_00000100 and <root>/step_00000100.tmp (paths only, nothing touched).
std::filesystem::path checkpoint_dir(const std::filesystem::path& root, int64_t step);
std::filesystem::path checkpoint_tmp_dir(const std::filesystem::path& root, int64_t step);

// Rank 0 only: creates <root> if needed and a fresh checkpoint_tmp_dir (a
// leftover one from a killed run is removed first); returns its path.
std::filesystem::path begin_checkpoint(const std::filesystem::path& root, int64_t step);

// Rank 0 only, after every rank has written its file: checks that `index`
// holds "step" and "rank_files" and that the listed files exist in `tmp_dir`,
// then writes tmp_dir/index.json (through a temp file, fsynced).
void write_checkpoint_index(const std::filesystem::path& tmp_dir, const nlohmann::json& index);

// Reads and validates <dir>/index.json (format above, rank files present).
// Errors name the file and what is wrong.
nlohmann::json read_checkpoint_index(const std::filesystem::path& dir);

// Validates tmp_dir's index (its step must match final_dir's name), fsyncs
// every file and tmp_dir, renames tmp_dir to final_dir and fsyncs the parent.
// An existing final_dir (the same step saved again after a resume) is replaced.
void commit_checkpoint(const std::filesystem::path& tmp_dir, const std::filesystem::path& final_dir);

struct CheckpointEntry {
  int64_t step = 0;
  std::filesystem::path dir;
};
// Complete checkpoints under `root`, oldest first (empty when root is missing).
// Each skipped step_* directory adds a line saying why to `*skipped` if given.
std::vector<CheckpointEntry> list_checkpoints(const std::filesystem::path& root,
                                              std::vector<std::string>* skipped = nullptr);
// The newest complete checkpoint directory, or nullopt when there is none.
std::optional<std::filesystem::path> find_latest_checkpoint(const std::filesystem::path& root,
                                                            std::vector<std::string>* skipped = nullptr);

// Rank 0 only, between checkpoints: removes all but the newest `keep_last`
// complete checkpoints (0 keeps all) and every step_*.tmp directory. Step
// directories that are not complete (no or bad index.json) are left alone for
// a person to look at. Returns the removed paths.
std::vector<std::filesystem::path> prune_checkpoints(const std::filesystem::path& root, int64_t keep_last);

}  // namespace loom
