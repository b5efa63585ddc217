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

// (batch, seq, heads, dim) rows of `bytes`-byte elements in tiles of box_rows rows x 128 bytes.
CUtensorMap row_tiles(CUtensorMapDataType type, int64_t bytes, const void* base, int64_t batch, int64_t seq,
                      int64_t heads, int64_t dim, int box_rows, const char* what) {
  const int64_t cols = 128 / bytes;
  LOOM_CHECK(dim % cols == 0 && box_rows > 0 && box_rows <= 256 && batch > 0 && seq > 0 && heads > 0)
      << "tensor maps: " << what << " (" << batch << ", " << seq << ", " << heads << ", " << dim << ") in tiles of "
      << box_rows << " rows (dim a multiple of " << cols << ", 1..256 rows)";
  // Innermost first: dim, heads, seq, batch; strides in bytes of dims 1..3.
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(seq), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(bytes * dim), static_cast<cuuint64_t>(bytes * dim * heads),
                                 static_cast<cuuint64_t>(bytes * dim * heads * seq)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(cols), 1, static_cast<cuuint32_t>(box_rows), 1};
  return encode(type, base, 4, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B, what);
}

}  // namespace

CUtensorMap rows_tensor_map(const void* base, int64_t batch, int64_t seq, int64_t heads, int64_t dim, int box_rows) {
  return row_tiles(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, base, batch, seq, heads, dim, box_rows, "bf16 rows");
}

}  // namespace loom::cuda::detail
