// Storage allocation on CPU (aligned, counted) and CUDA (stream-ordered pool),
// raw copies between devices, and per-device memory statistics.
// Host -> device copies up to kStagingBytes go through a small ring of pinned
// staging buffers per device: the host bytes are copied into a free slot and
// the transfer is queued on the stream without waiting for it (the caller may
// reuse its buffer at once). Device -> host copies wait for the stream, because
// host code reads the bytes right after.
#include "framework/storage.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "framework/cuda_runtime.h"
#include "framework/stream.h"

namespace loom {

namespace {
constexpr size_t kCpuAlignment = 64;

struct Counters {
  std::atomic<int64_t> current{0};
  std::atomic<int64_t> peak{0};
  std::atomic<int64_t> allocations{0};
};

// One counter set per device: index 0 is the CPU, 1 + i is cuda:i.
Counters& counters_for(Device device) {
  static Counters cpu;
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Counters>> cuda;
  if (device.is_cpu()) return cpu;
  std::lock_guard<std::mutex> lock(mutex);
  if (cuda.size() <= static_cast<size_t>(device.index)) cuda.resize(device.index + 1);
  if (!cuda[device.index]) cuda[device.index] = std::make_unique<Counters>();
  return *cuda[device.index];
}

constexpr size_t kStagingBytes = size_t{8} << 20;  // larger uploads are rare (loading) and go unstaged
constexpr int kStagingSlots = 4;

// Pinned buffers for uploads to one device; each slot's event marks when the
// device has finished reading it. Kept for the process lifetime like the
// default streams (a slot may be in flight during static destruction).
struct StagingRing {
  struct Slot {
    void* pinned = nullptr;
    size_t capacity = 0;
    std::unique_ptr<Event> done;
  };
  std::mutex mutex;
  Slot slots[kStagingSlots];
  int next = 0;
};

StagingRing& staging_for(int device) {
  static std::mutex mutex;
  static std::vector<StagingRing*> rings;
  std::lock_guard<std::mutex> lock(mutex);
  if (rings.size() <= static_cast<size_t>(device)) rings.resize(device + 1, nullptr);
  if (rings[device] == nullptr) rings[device] = new StagingRing();  // never freed (see above)
  return *rings[device];
}

// Host -> device through a pinned slot, ordered on `s`; returns without waiting for the transfer.
void staged_upload(void* dst, const void* src, size_t nbytes, Device device, Stream& s) {
  StagingRing& ring = staging_for(device.index);
  std::lock_guard<std::mutex> lock(ring.mutex);
  StagingRing::Slot& slot = ring.slots[ring.next];
  ring.next = (ring.next + 1) % kStagingSlots;
  // Host wait, needed before overwriting the pinned bytes: only on the upload
  // issued kStagingSlots uploads ago, normally long finished.
  if (slot.done) slot.done->synchronize();
  if (slot.capacity < nbytes) {
    if (slot.pinned != nullptr) cuda_rt::host_free_pinned(slot.pinned);
    slot.pinned = nullptr;
    size_t capacity = std::max<size_t>(nbytes, size_t{64} << 10);
    slot.pinned = cuda_rt::host_alloc_pinned(capacity);
    slot.capacity = capacity;
  }
  if (!slot.done) slot.done = std::make_unique<Event>(device);
  std::memcpy(slot.pinned, src, nbytes);
  cuda_rt::memcpy_async(dst, slot.pinned, nbytes, cuda_rt::CopyKind::host_to_device, device.index, s.handle());
  slot.done->record(s);
}

void count_alloc(Device device, int64_t nbytes) {
  Counters& c = counters_for(device);
  int64_t now = c.current.fetch_add(nbytes) + nbytes;
  int64_t peak = c.peak.load();
  while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
  }
  c.allocations.fetch_add(1);
}
}  // namespace

Storage::Storage(size_t nbytes, Device device, Stream* stream) : nbytes_(nbytes), device_(device) {
  size_t request = nbytes == 0 ? 1 : nbytes;
  if (device.is_cpu()) {
    size_t rounded = (request + kCpuAlignment - 1) / kCpuAlignment * kCpuAlignment;
    data_ = std::aligned_alloc(kCpuAlignment, rounded);
    LOOM_CHECK(data_ != nullptr) << "out of host memory allocating " << nbytes << " bytes";
  } else {
    Stream& s = stream != nullptr ? *stream : Stream::default_for(device);
    LOOM_CHECK(s.device() == device) << "allocating on " << device << " with a stream of " << s.device();
    stream_handle_ = s.handle();
    data_ = cuda_rt::malloc_async(request, device.index, stream_handle_);
  }
  count_alloc(device, static_cast<int64_t>(nbytes));
}

Storage::~Storage() {
  counters_for(device_).current.fetch_sub(static_cast<int64_t>(nbytes_));
  if (device_.is_cpu()) {
    std::free(data_);
    return;
  }
  try {
    cuda_rt::free_async(data_, device_.index, stream_handle_);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "loom: freeing device memory failed: %s\n", e.what());  // destructors must not throw
  }
}

MemoryStats memory_stats(Device device) {
  Counters& c = counters_for(device);
  return {c.current.load(), c.peak.load(), c.allocations.load()};
}

void reset_peak_memory(Device device) {
  Counters& c = counters_for(device);
  c.peak.store(c.current.load());
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes, Stream* stream) {
  if (nbytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, nbytes);
    return;
  }
  Device gpu = dst_device.is_cuda() ? dst_device : src_device;
  Stream& s = stream != nullptr ? *stream : Stream::default_for(gpu);
  cuda_rt::CopyKind kind = dst_device.is_cpu()   ? cuda_rt::CopyKind::device_to_host
                           : src_device.is_cpu() ? cuda_rt::CopyKind::host_to_device
                                                 : cuda_rt::CopyKind::device_to_device;
  if (kind == cuda_rt::CopyKind::host_to_device && nbytes <= kStagingBytes) {
    staged_upload(dst, src, nbytes, gpu, s);
    return;
  }
  cuda_rt::memcpy_async(dst, src, nbytes, kind, gpu.index, s.handle());
  // A copy to the host is consumed by host code right after, and a large
  // pageable upload must finish before the caller may free its buffer: wait here.
  if (dst_device.is_cpu() || src_device.is_cpu()) s.synchronize();
}

bool cuda_is_available() { return cuda_rt::device_count() > 0; }
int cuda_device_count() { return cuda_rt::device_count(); }
std::string cuda_unavailable_reason() { return cuda_rt::unavailable_reason(); }

}  // namespace loom
