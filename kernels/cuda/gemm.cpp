// cuBLASLt GEMM (see gemm.h). cuBLASLt is column-major: a row-major (R, C)
// matrix is the column-major (C, R) matrix with the same leading dimension,
// so row-major C = op(A) op(B) is computed as column-major C^T = op(B)^T op(A)^T:
// the operands swap places and keep their transpose flags.
#include "kernels/cuda/gemm.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "framework/cuda_check.h"

#define LOOM_CUBLAS_CHECK(call) LOOM_CHECK_STATUS(call, CUBLAS_STATUS_SUCCESS, cublasLtGetStatusString)

namespace loom::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // cuBLASLt's recommendation for Hopper

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    case DType::f32: return CUDA_R_32F;
    default: LOOM_FAIL() << "gemm: dtype " << d << " is not supported on CUDA (bf16, f16, f32)";
  }
}

cublasLtHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t handle;
  LOOM_CUBLAS_CHECK(cublasLtCreate(&handle));
  handles[device] = handle;  // kept for the process lifetime
  return handle;
}

// The stride between consecutive matrices of `t` (0 when it has no batch dims),
// checking that its batch dims collapse to one stride over `batch` matrices.
int64_t batch_stride(const Tensor& t, int64_t batch, const char* name) {
  if (t.dim() == 2 || batch == 1) return 0;
  int64_t stride = t.stride(t.dim() - 3);
  int64_t expected = stride;
  for (int64_t d = t.dim() - 3; d >= 0; --d) {
    if (t.size(d) != 1) {
      LOOM_CHECK(t.stride(d) == expected) << "gemm: " << name << " " << shape_str(t.shape()) << " strides "
                                          << shape_str(t.strides()) << ": batch dims must collapse to one stride";
    }
    expected *= t.size(d);
  }
  return stride;
}

struct Key {
  int device, a_type, c_type, trans_a, trans_b;
  int64_t m, n, k, batch, lda, ldb, ldc, stride_a, stride_b;
  bool operator<(const Key& o) const {
    return std::tie(device, a_type, c_type, trans_a, trans_b, m, n, k, batch, lda, ldb, ldc, stride_a, stride_b) <
           std::tie(o.device, o.a_type, o.c_type, o.trans_a, o.trans_b, o.m, o.n, o.k, o.batch, o.lda, o.ldb, o.ldc,
                    o.stride_a, o.stride_b);
  }
};

// Descriptors and the chosen algorithm of one problem, built once.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_a = nullptr, layout_b = nullptr, layout_c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

std::mutex plans_mutex;
std::map<Key, Plan>& plans() {
  static std::map<Key, Plan> cache;
  return cache;
}

cublasLtMatrixLayout_t make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, int64_t batch,
                                   int64_t stride) {
  cublasLtMatrixLayout_t layout;
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld));
  int32_t count = static_cast<int32_t>(batch);
  LOOM_CUBLAS_CHECK(
      cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                     sizeof(stride)));
  return layout;
}

const Plan& plan_for(const Key& key, cudaDataType_t in_type, cudaDataType_t out_type, cublasLtHandle_t handle) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans().find(key);
  if (it != plans().end()) return it->second;
  Plan p;
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // Column-major C^T (N x M) = op(B)^T (N x K) * op(A)^T (K x M): cuBLAS "A" is b, "B" is a.
  cublasOperation_t op_first = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t op_second = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  LOOM_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  // Stored column-major shapes: b is (N, K) or (K, N) when trans_b; a is (K, M) or (M, K) when trans_a.
  p.layout_a = make_layout(in_type, key.trans_b ? key.k : key.n, key.trans_b ? key.n : key.k, key.ldb, key.batch,
                           key.stride_b);
  p.layout_b = make_layout(in_type, key.trans_a ? key.m : key.k, key.trans_a ? key.k : key.m, key.lda, key.batch,
                           key.stride_a);
  p.layout_c = make_layout(out_type, key.n, key.m, key.ldc, key.batch, key.m * key.n);
  cublasLtMatmulPreference_t pref;
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  size_t max_workspace = kWorkspaceBytes;
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &max_workspace, sizeof(max_workspace)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  LOOM_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.layout_a, p.layout_b, p.layout_c, p.layout_c,
                                                   pref, 1, &result, &found));
  cublasLtMatmulPreferenceDestroy(pref);
  LOOM_CHECK(found > 0) << "gemm: cuBLASLt has no algorithm for M " << key.m << ", N " << key.n << ", K " << key.k
                        << ", batch " << key.batch;
  p.algo = result.algo;
  p.workspace = result.workspaceSize;
  return plans().emplace(key, p).first->second;
}

}  // namespace

size_t gemm_cached_algorithms() {
  std::lock_guard<std::mutex> lock(plans_mutex);
  return plans().size();
}

void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta,
          Stream& s) {
  LOOM_CHECK(c.device().is_cuda() && a.device() == c.device() && b.device() == c.device())
      << "gemm: tensors on " << a.device() << ", " << b.device() << " -> " << c.device() << " (one CUDA device)";
  LOOM_CHECK(s.device() == c.device()) << "gemm: stream of " << s.device() << " for tensors on " << c.device();
  LOOM_CHECK(a.dim() >= 2 && b.dim() >= 2 && c.dim() >= 2)
      << "gemm: a " << shape_str(a.shape()) << ", b " << shape_str(b.shape()) << ", c " << shape_str(c.shape())
      << " must be at least 2-d";
  LOOM_CHECK(c.is_contiguous()) << "gemm: c must be contiguous";
  LOOM_CHECK(a.dtype() == b.dtype()) << "gemm: a is " << a.dtype() << ", b is " << b.dtype();
  LOOM_CHECK(c.dtype() == DType::f32 || c.dtype() == a.dtype())
      << "gemm: output " << c.dtype() << " for " << a.dtype() << " inputs (allowed: f32 or the inputs' dtype)";
  const int64_t m = c.size(-2), n = c.size(-1);
  const int64_t k = trans_a ? a.size(-2) : a.size(-1);
  const int64_t a_rows = trans_a ? k : m, b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  LOOM_CHECK(a.size(-2) == a_rows && a.size(-1) == (trans_a ? m : k) && b.size(-2) == b_rows && b.size(-1) == b_cols)
      << "gemm: a " << shape_str(a.shape()) << (trans_a ? "^T" : "") << " @ b " << shape_str(b.shape())
      << (trans_b ? "^T" : "") << " does not give c " << shape_str(c.shape());
  LOOM_CHECK(a.stride(-1) == 1 && b.stride(-1) == 1) << "gemm: matrices need unit column stride (a strides "
                                                     << shape_str(a.strides()) << ", b " << shape_str(b.strides())
                                                     << ")";
  const int64_t batch = c.numel() / std::max<int64_t>(1, m * n);
  for (const Tensor* t : {&a, &b})
    if (t->dim() > 2) {
      Shape lead(t->shape().begin(), t->shape().end() - 2), want(c.shape().begin(), c.shape().end() - 2);
      LOOM_CHECK(lead == want) << "gemm: batch dims " << shape_str(lead) << " differ from c's " << shape_str(want);
    }
  if (c.numel() == 0) return;
  if (k == 0) {
    LOOM_CHECK(beta == 0.0) << "gemm: K = 0 with beta " << beta << " is not supported";
    LOOM_CUDA_CHECK(cudaMemsetAsync(c.raw_data(), 0, c.nbytes(), static_cast<cudaStream_t>(s.handle())));
    return;
  }
  Key key{c.device().index, static_cast<int>(a.dtype()), static_cast<int>(c.dtype()), trans_a, trans_b, m, n, k, batch,
          std::max<int64_t>(1, a.stride(-2)), std::max<int64_t>(1, b.stride(-2)), n,
          batch_stride(a, batch, "a"), batch_stride(b, batch, "b")};
  cublasLtHandle_t handle = handle_for(c.device().index);
  const Plan& p = plan_for(key, cuda_type(a.dtype()), cuda_type(c.dtype()), handle);
  // Allocated and (at scope end) freed on `s`, so the pool reuses it only after this product ran.
  std::unique_ptr<Storage> workspace;
  if (p.workspace > 0) workspace = std::make_unique<Storage>(p.workspace, c.device(), &s);
  float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  LOOM_CUBLAS_CHECK(cublasLtMatmul(handle, p.desc, &alpha_f, b.raw_data(), p.layout_a, a.raw_data(), p.layout_b,
                                   &beta_f, c.raw_data(), p.layout_c, c.raw_data(), p.layout_c, &p.algo,
                                   workspace ? workspace->data() : nullptr, p.workspace,
                                   static_cast<cudaStream_t>(s.handle())));
}

}  // namespace loom::cuda
