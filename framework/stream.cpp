// Stream/Event: thin owners of CUDA handles; no-ops on CPU.
#include "framework/stream.h"

#include <memory>
#include <mutex>
#include <vector>

#include "framework/cuda_runtime.h"

namespace loom {

Stream& Stream::default_for(Device device) {
  static Stream cpu_stream(Device::cpu(), nullptr, false);
  if (device.is_cpu()) return cpu_stream;
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Stream>> cuda_streams;
  std::lock_guard<std::mutex> lock(mutex);
  if (cuda_streams.size() <= static_cast<size_t>(device.index)) cuda_streams.resize(device.index + 1);
  auto& slot = cuda_streams[device.index];
  // Created once per device and kept for the process lifetime (never destroyed:
  // device memory may still be freed on it during static destruction).
  if (!slot) slot.reset(new Stream(device, cuda_rt::stream_create(device.index), false));
  return *slot;
}

Stream::Stream(Device device) : device_(device), owned_(true) {
  if (device.is_cuda()) handle_ = cuda_rt::stream_create(device.index);
}

Stream::~Stream() {
  if (owned_ && handle_ != nullptr) {
    try {
      cuda_rt::stream_destroy(device_.index, handle_);
    } catch (...) {
    }
  }
}

void Stream::synchronize() const {
  if (device_.is_cuda()) cuda_rt::stream_synchronize(device_.index, handle_);
}

Event::Event(Device device) : device_(device) {
  if (device.is_cuda()) handle_ = cuda_rt::event_create(device.index);
}
Event::~Event() {
  if (handle_ != nullptr) {
    try {
      cuda_rt::event_destroy(device_.index, handle_);
    } catch (...) {
    }
  }
}
void Event::record(Stream& stream) {
  if (device_.is_cuda()) cuda_rt::event_record(device_.index, handle_, stream.handle());
}
void Event::wait(Stream& stream) const {
  if (device_.is_cuda()) cuda_rt::stream_wait_event(device_.index, stream.handle(), handle_);
}
void Event::synchronize() const {
  if (device_.is_cuda()) cuda_rt::event_synchronize(device_.index, handle_);
}
bool Event::query() const { return device_.is_cpu() || cuda_rt::event_query(device_.index, handle_); }
float Event::elapsed_ms(const Event& later) const {
  LOOM_CHECK(device_.is_cuda()) << "Event::elapsed_ms needs CUDA events, got " << device_;
  return cuda_rt::event_elapsed_ms(handle_, later.handle_);
}

}  // namespace loom
