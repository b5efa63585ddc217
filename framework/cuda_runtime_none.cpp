// CPU-only build: CUDA devices are unavailable and every CUDA call throws.
#include "framework/cuda_runtime.h"
#include "framework/error.h"

namespace loom::cuda_rt {

namespace {
[[noreturn]] void no_cuda(const char* what) {
  LOOM_FAIL() << what << ": loom was built without CUDA (configure with -DLOOM_CUDA=ON on a machine with nvcc)";
}
}  // namespace

bool built_with_cuda() { return false; }
int device_count() { return 0; }
std::string unavailable_reason() { return "loom was built without CUDA"; }
void* malloc_async(size_t, int, void*) { no_cuda("CUDA allocation"); }
void free_async(void*, int, void*) { no_cuda("CUDA free"); }
void memcpy_async(void*, const void*, size_t, CopyKind, int, void*) { no_cuda("CUDA copy"); }
void memset_async(void*, int, size_t, int, void*) { no_cuda("CUDA memset"); }
void* stream_create(int) { no_cuda("CUDA stream"); }
void stream_destroy(int, void*) { no_cuda("CUDA stream"); }
void stream_synchronize(int, void*) { no_cuda("CUDA stream"); }
void* event_create(int) { no_cuda("CUDA event"); }
void event_destroy(int, void*) { no_cuda("CUDA event"); }
void event_record(int, void*, void*) { no_cuda("CUDA event"); }
void stream_wait_event(int, void*, void*) { no_cuda("CUDA event"); }
void event_synchronize(int, void*) { no_cuda("CUDA event"); }
float event_elapsed_ms(void*, void*) { no_cuda("CUDA event"); }
bool event_query(int, void*) { no_cuda("CUDA event"); }
void set_current_device(int) { no_cuda("CUDA device"); }
void* host_alloc_pinned(size_t) { no_cuda("pinned host memory"); }
void host_free_pinned(void*) { no_cuda("pinned host memory"); }
void strided_copy(void*, int, const StridedLayout&, const void*, int, const StridedLayout&, int, void*) {
  no_cuda("CUDA copy");
}
void strided_fill(void*, int, const StridedLayout&, double, int, void*) { no_cuda("CUDA fill"); }

}  // namespace loom::cuda_rt
