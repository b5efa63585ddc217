// Tensor maps (tma.h) through the driver's cuTensorMapEncodeTiled, found at run
// time through the runtime (no link against the driver library).
#include "kernels/cuda/tma.h"

#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <mutex>

#include "framework/cuda_check.h"
#include "framework/error.h"

namespace loom::cuda::detail {

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    LOOM_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found));
    LOOM_CHECK(found == cudaDriverEntryPointSuccess && p != nullptr)
        << "tensor maps: the driver has no cuTensorMapEncodeTiled (needs a CUDA 12 driver)";
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  return fn;
}

CUtensorMap encode(CUtensorMapDataType type, const void* base, cuuint32_t rank, const cuuint64_t* dims,
                   const cuuint64_t* strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle, const char* what) {
  LOOM_CHECK(reinterpret_cast<uintptr_t>(base) % 16 == 0)
      << "tensor maps: " << what << " at " << base << " is not 16-byte aligned";
  const cuuint32_t ones[5] = {1, 1, 1, 1, 1};
  CUtensorMap map{};
  const CUresult r = encode_tiled()(&map, type, rank, const_cast<void*>(base), dims, strides, box, ones,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  LOOM_CHECK(r == CUDA_SUCCESS) << "tensor maps: cuTensorMapEncodeTiled failed (" << static_cast<int>(r) << ") for "
                                << what;
  return map;
}

}  // namespace

CUtensorMap rows_tensor_map(const void* base, int64_t batch, int64_t seq, int64_t heads, int64_t dim, int box_rows) {
  LOOM_CHECK(dim % 64 == 0 && box_rows > 0 && box_rows <= 256 && batch > 0 && seq > 0 && heads > 0)
      << "tensor maps: bf16 rows (" << batch << ", " << seq << ", " << heads << ", " << dim << ") in tiles of "
      << box_rows << " rows (dim a multiple of 64, 1..256 rows)";
  // Innermost first: dim, heads, seq, batch; strides in bytes of dims 1..3; boxes of 64 columns (128 bytes).
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(seq), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(2 * dim), static_cast<cuuint64_t>(2 * dim * heads),
                                 static_cast<cuuint64_t>(2 * dim * heads * seq)};
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(box_rows), 1};
  return encode(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, 4, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B,
                "bf16 rows");
}

}  // namespace loom::cuda::detail
