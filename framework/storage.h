// Storage: a reference-counted block of device memory, and the allocator stats.
// CPU memory is 64-byte aligned. CUDA memory comes from the stream-ordered pool
// (cudaMallocAsync) and is freed on the stream it was allocated on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "framework/dtype.h"

namespace loom {

class Stream;

class Storage {
 public:
  // Allocates `nbytes` on `device` (on `stream` for CUDA; may be null for CPU).
  Storage(size_t nbytes, Device device, Stream* stream = nullptr);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  void* stream_handle_ = nullptr;  // cudaStream_t the block is freed on
};

struct MemoryStats {
  int64_t current_bytes = 0;  // live bytes held by Storage objects
  int64_t peak_bytes = 0;     // high-water mark since the last reset
  int64_t allocations = 0;    // number of Storage allocations
};
MemoryStats memory_stats(Device device);
void reset_peak_memory(Device device);

// Raw copies between any two devices (host <-> device, device <-> device).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes,
                Stream* stream = nullptr);

// CUDA availability (false when built without CUDA or when no GPU/driver is present).
bool cuda_is_available();
int cuda_device_count();
// Why CUDA is not available, for test skip messages ("" when it is).
std::string cuda_unavailable_reason();

}  // namespace loom
