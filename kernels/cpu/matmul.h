// Matrix products on CPU through OpenBLAS (cblas_sgemm / cblas_dgemm), batched
// over any number of leading dims. Transposes are BLAS flags, not copies: the
// op layer hands over the stored matrix and says whether to read it transposed.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// c (..., M, N) = alpha * op(a) @ op(b) + beta * c, for every batch index of c.
// a is stored (..., M, K), or (..., K, M) when trans_a; b is stored (..., K, N),
// or (..., N, K) when trans_b. a and b have c's batch dims (or none, meaning
// the same matrix for every batch); their batch strides are free (0 broadcasts),
// but each matrix must be row-major with unit column stride (rows may be padded).
// c is contiguous. f32 and f64; all three of one dtype.
void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta,
          Stream& s);

}  // namespace loom::cpu
