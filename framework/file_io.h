// Durable file writes shared by every writer of run artifacts (config.yaml,
// token shards, checkpoint indexes, config.json): a file is replaced
// atomically — written to a unique temp file beside it, fsynced, renamed over
// the target, and the directory fsynced — so a crash leaves the old file or
// the whole new one, never a torn one.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace loom {

// Writes `size` bytes to `path` atomically (parent directories are created).
void write_file_atomic(const std::filesystem::path& path, const void* data, size_t size);
inline void write_file_atomic(const std::filesystem::path& path, const std::string& contents) {
  write_file_atomic(path, contents.data(), contents.size());
}

// fsync a regular file or a directory (by path); throws naming it on failure.
void fsync_path(const std::filesystem::path& path);

}  // namespace loom
