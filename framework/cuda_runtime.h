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

// Page-locked host memory (staging for host -> device copies).
void* host_alloc_pinned(size_t nbytes);
void host_free_pinned(void* ptr);

void* event_create(int device);
void event_destroy(int device, void* event);
void event_record(int device, void* event, void* stream);
void stream_wait_event(int device, void* stream, void* event);
void event_synchronize(int device, void* event);
float event_elapsed_ms(void* start, void* end);
bool event_query(int device, void* event);  // true once the recorded work is done (never blocks)
void set_current_device(int device);         // for libraries that use the current device (NCCL, cuBLAS)

// Element-wise work of the Tensor layer itself on device memory (framework/cuda_copy.cu):
// a strided copy with dtype conversion and a strided fill, over up to kMaxDims dims.
// Dtypes are loom::DType values passed as int so this header stays free of the core types.
constexpr int kMaxDims = 12;
struct StridedLayout {
  int ndim = 0;
  long long shape[kMaxDims];
  long long strides[kMaxDims];  // in elements
  long long offset = 0;         // in elements, from the base pointer
};
void strided_copy(void* dst_base, int dst_dtype, const StridedLayout& dst, const void* src_base, int src_dtype,
                  const StridedLayout& src, int device, void* stream);
void strided_fill(void* dst_base, int dtype, const StridedLayout& dst, double value, int device, void* stream);

}  // namespace loom::cuda_rt
