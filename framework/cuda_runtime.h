// The narrow set of CUDA runtime calls the framework core needs, so that the
// core compiles without CUDA headers. Implemented in cuda_runtime.cpp (CUDA
// builds) or cuda_runtime_none.cpp (CPU-only builds: every call throws
// "built without CUDA", and availability reports false with that reason).
#pragma once

#include <cstddef>
#include <string>

namespace loom::cuda_rt {

bool built_with_cuda();
int device_count();                 // 0 when no GPU/driver
std::string unavailable_reason();   // "" when a GPU is usable

void* malloc_async(size_t nbytes, int device, void* stream);
void free_async(void* ptr, int device, void* stream);
enum class CopyKind { host_to_device, device_to_host, device_to_device };
void memcpy_async(void* dst, const void* src, size_t nbytes, CopyKind kind, int device, void* stream);
void memset_async(void* dst, int value, size_t nbytes, int device, void* stream);

void* stream_create(int device);
void stream_destroy(int device, void* stream);
void stream_synchronize(int device, void* stream);

void* event_create(int device);
void event_destroy(int device, void* event);
void event_record(int device, void* event, void* stream);
void stream_wait_event(int device, void* stream, void* event);
void event_synchronize(int device, void* event);
float event_elapsed_ms(void* start, void* end);

}  // namespace loom::cuda_rt
