// Batched GEMM over OpenBLAS. Each batch index is one cblas_?gemm call on
// pointers computed from the operands' batch strides, so broadcast operands
// (stride 0, or a plain 2-D matrix) are never copied. Many small matrices are
// spread over OpenMP threads by batch; large ones leave threading to OpenBLAS
// (which runs single-threaded below about 2^18 multiply-adds anyway).
#include "kernels/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "kernels/cpu/elementwise.h"

namespace loom::cpu {

namespace {

// Row stride of the stored matrix in the last two dims of `t` (BLAS's lda).
int64_t leading_dim(const Tensor& t, const char* name) {
  int64_t rows = t.size(-2), cols = t.size(-1);
  LOOM_CHECK(cols <= 1 || t.stride(-1) == 1)
      << "gemm: " << name << " " << shape_str(t.shape()) << " strides " << shape_str(t.strides())
      << " needs unit column stride";
  int64_t ld = rows <= 1 ? std::max<int64_t>(cols, 1) : t.stride(-2);
  LOOM_CHECK(ld >= std::max<int64_t>(cols, 1))
      << "gemm: " << name << " " << shape_str(t.shape()) << " has row stride " << ld << " below its width";
  return ld;
}

// Element offset of every batch matrix of `t` within its storage, for the batch
// shape `batch` (t has those batch dims, or none: the same matrix every time).
std::vector<int64_t> batch_offsets(const Tensor& t, const Shape& batch, const char* name) {
  int64_t count = shape_numel(batch);
  std::vector<int64_t> offsets(count, t.offset());
  if (t.dim() == 2) return offsets;
  LOOM_CHECK(t.dim() == static_cast<int64_t>(batch.size()) + 2 &&
             Shape(t.shape().begin(), t.shape().end() - 2) == batch)
      << "gemm: " << name << " " << shape_str(t.shape()) << " does not have the batch dims " << shape_str(batch);
  int64_t nb = static_cast<int64_t>(batch.size());
  for (int64_t i = 0; i < count; ++i) {
    int64_t rest = i, off = t.offset();
    for (int64_t d = nb - 1; d >= 0; --d) {
      off += (rest % batch[d]) * t.stride(d);
      rest /= batch[d];
    }
    offsets[i] = off;
  }
  return offsets;
}

void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// One GEMM per batch index; small matrices are spread over threads by batch.
template <typename T>
void batched_gemm(T* c, const T* a, const std::vector<int64_t>& a_off, const T* b, const std::vector<int64_t>& b_off,
                  CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, T alpha, int lda, int ldb, T beta) {
  int64_t count = static_cast<int64_t>(a_off.size());
  // Threads pay off only with enough total work (waking them costs microseconds,
  // far more under load); big matrices are threaded inside OpenBLAS instead.
  int64_t per_matrix = int64_t{m} * n * k;
  bool spread = count > 1 && per_matrix < (int64_t{1} << 18) && count * per_matrix >= (int64_t{1} << 17);
#pragma omp parallel for schedule(static) if (spread)
  for (int64_t i = 0; i < count; ++i)
    blas_gemm(ta, tb, m, n, k, alpha, a + a_off[i], lda, b + b_off[i], ldb, beta, c + i * m * n, n);
}

}  // namespace

void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta,
          Stream& s) {
  LOOM_CHECK(a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu())
      << "gemm: CPU kernel got tensors on " << a.device() << ", " << b.device() << ", " << c.device();
  LOOM_CHECK(a.dtype() == b.dtype() && a.dtype() == c.dtype())
      << "gemm: dtypes differ, a " << a.dtype() << ", b " << b.dtype() << ", c " << c.dtype();
  LOOM_CHECK(c.dim() >= 2 && a.dim() >= 2 && b.dim() >= 2)
      << "gemm: needs matrices, got a " << shape_str(a.shape()) << ", b " << shape_str(b.shape()) << ", c "
      << shape_str(c.shape());
  LOOM_CHECK(c.is_contiguous()) << "gemm: output " << shape_str(c.shape()) << " must be contiguous";
  int64_t m = c.size(-2), n = c.size(-1);
  int64_t k = trans_a ? a.size(-2) : a.size(-1);
  int64_t a_m = trans_a ? a.size(-1) : a.size(-2);
  int64_t b_k = trans_b ? b.size(-1) : b.size(-2), b_n = trans_b ? b.size(-2) : b.size(-1);
  LOOM_CHECK(a_m == m && b_k == k && b_n == n)
      << "gemm: a " << shape_str(a.shape()) << (trans_a ? "^T" : "") << " @ b " << shape_str(b.shape())
      << (trans_b ? "^T" : "") << " does not give c " << shape_str(c.shape());
  Shape batch(c.shape().begin(), c.shape().end() - 2);
  std::vector<int64_t> a_off = batch_offsets(a, batch, "a"), b_off = batch_offsets(b, batch, "b");
  if (shape_numel(batch) == 0 || m == 0 || n == 0) return;
  if (k == 0) {  // empty sum: c = beta * c (BLAS does not promise this for k = 0)
    if (beta == 0.0) c.zero_();
    else scale(c, c, beta, 0.0, s);  // element-wise, so in place is safe
    return;
  }
  int64_t lda = leading_dim(a, "a"), ldb = leading_dim(b, "b");
  for (int64_t v : {m, n, k, lda, ldb})
    LOOM_CHECK(v <= INT_MAX) << "gemm: size " << v << " exceeds the 32-bit BLAS interface";
  CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  LOOM_DISPATCH_FLOAT(c.dtype(), T, [&] {
    batched_gemm(c.data<T>(), static_cast<const T*>(a.storage()->data()), a_off,
                 static_cast<const T*>(b.storage()->data()), b_off, ta, tb, static_cast<int>(m), static_cast<int>(n),
                 static_cast<int>(k), static_cast<T>(alpha), static_cast<int>(lda), static_cast<int>(ldb),
                 static_cast<T>(beta));
  });
}

}  // namespace loom::cpu
