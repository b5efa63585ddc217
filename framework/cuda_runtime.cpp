// CUDA build: device memory from the stream-ordered pool, copies, streams, events.
// The pool's release threshold is raised to "keep everything" on first use, so
// steady-state training steps reuse pool memory without calling the driver.
#include "framework/cuda_runtime.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "framework/cuda_check.h"

namespace loom::cuda_rt {

namespace {
void set_device(int device) { LOOM_CUDA_CHECK(cudaSetDevice(device)) << "device " << device; }

void configure_pool_once(int device) {
  static std::mutex mutex;
  static std::vector<bool> configured;
  std::lock_guard<std::mutex> lock(mutex);
  if (configured.size() <= static_cast<size_t>(device)) configured.resize(device + 1, false);
  if (configured[device]) return;
  cudaMemPool_t pool;
  LOOM_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = UINT64_MAX;
  LOOM_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  configured[device] = true;
}
}  // namespace

bool built_with_cuda() { return true; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string unavailable_reason() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("no usable GPU: cudaGetDeviceCount returned ") + cudaGetErrorString(status) + " (error " +
           std::to_string(static_cast<int>(status)) + ")";
  }
  if (count == 0) return "no GPU present";
  return "";
}

void* malloc_async(size_t nbytes, int device, void* stream) {
  set_device(device);
  configure_pool_once(device);
  void* ptr = nullptr;
  LOOM_CUDA_CHECK(cudaMallocAsync(&ptr, nbytes, static_cast<cudaStream_t>(stream)))
      << "allocating " << nbytes << " bytes on cuda:" << device;
  return ptr;
}

void free_async(void* ptr, int device, void* stream) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream)));
}

void memcpy_async(void* dst, const void* src, size_t nbytes, CopyKind kind, int device, void* stream) {
  set_device(device);
  cudaMemcpyKind k = kind == CopyKind::host_to_device   ? cudaMemcpyHostToDevice
                     : kind == CopyKind::device_to_host ? cudaMemcpyDeviceToHost
                                                        : cudaMemcpyDefault;  // device to device, also across devices (UVA)
  LOOM_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, k, static_cast<cudaStream_t>(stream))) << nbytes << " bytes";
}

void memset_async(void* dst, int value, size_t nbytes, int device, void* stream) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaMemsetAsync(dst, value, nbytes, static_cast<cudaStream_t>(stream)));
}

void* stream_create(int device) {
  set_device(device);
  cudaStream_t stream;
  LOOM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}
void stream_destroy(int device, void* stream) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaStreamDestroy(static_cast<cudaStream_t>(stream)));
}
void stream_synchronize(int device, void* stream) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

void* event_create(int device) {
  set_device(device);
  cudaEvent_t event;
  LOOM_CUDA_CHECK(cudaEventCreate(&event));
  return event;
}
void event_destroy(int device, void* event) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaEventDestroy(static_cast<cudaEvent_t>(event)));
}
void event_record(int device, void* event, void* stream) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
}
void stream_wait_event(int device, void* stream, void* event) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
}
void event_synchronize(int device, void* event) {
  set_device(device);
  LOOM_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
}
bool event_query(int device, void* event) {
  set_device(device);
  cudaError_t status = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (status == cudaErrorNotReady) return false;
  LOOM_CUDA_CHECK(status) << "cudaEventQuery";
  return true;
}
void set_current_device(int device) { set_device(device); }

void* host_alloc_pinned(size_t nbytes) {
  void* ptr = nullptr;
  LOOM_CUDA_CHECK(cudaMallocHost(&ptr, nbytes == 0 ? 1 : nbytes)) << "pinning " << nbytes << " host bytes";
  return ptr;
}
void host_free_pinned(void* ptr) { LOOM_CUDA_CHECK(cudaFreeHost(ptr)); }

float event_elapsed_ms(void* start, void* end) {
  float ms = 0.f;
  LOOM_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
  return ms;
}

}  // namespace loom::cuda_rt
