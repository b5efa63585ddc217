// Stream and Event: explicit ordering of device work. On CPU a Stream is a
// placeholder (work runs synchronously); on CUDA it wraps a cudaStream_t.
// Every kernel entry point takes the Stream it runs on.
#pragma once

#include "framework/dtype.h"

namespace loom {

class Stream {
 public:
  // The default stream of `device` (CPU: synchronous; CUDA: a per-device
  // non-blocking stream created on first use).
  static Stream& default_for(Device device);
  // A new stream of its own (CUDA: non-blocking, created here, destroyed with it).
  explicit Stream(Device device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  Device device() const { return device_; }
  void* handle() const { return handle_; }  // cudaStream_t, null on CPU
  void synchronize() const;

 private:
  Stream(Device device, void* handle, bool owned) : device_(device), handle_(handle), owned_(owned) {}
  Device device_;
  void* handle_ = nullptr;
  bool owned_ = false;
};

class Event {
 public:
  explicit Event(Device device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(Stream& stream);
  void wait(Stream& stream) const;  // `stream` waits for this event (no host sync)
  void synchronize() const;
  // True once the work recorded before it has finished (never blocks; CPU: always true).
  bool query() const;
  float elapsed_ms(const Event& later) const;  // CUDA only

 private:
  Device device_;
  void* handle_ = nullptr;  // cudaEvent_t, null on CPU
};

}  // namespace loom
