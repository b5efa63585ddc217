// Matrix products on CUDA through cuBLASLt: bf16 (or f16, f32) inputs, fp32
// accumulation, bf16 or fp32 outputs, transposes as flags, strided batches
// (a batch stride of 0 broadcasts one matrix over the batch). The same
// contract as cpu::gemm (kernels/cpu/matmul.h), which is its test oracle.
// Algorithm choices are cached per shape and dtype; the workspace comes from
// the stream-ordered pool.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// c (..., M, N) = alpha * op(a) @ op(b) + beta * c for every batch index of c.
// a is stored (..., M, K), or (..., K, M) when trans_a; b is stored (..., K, N),
// or (..., N, K) when trans_b. a and b have c's batch dims or none; their batch
// dims must collapse to one stride (as contiguous tensors' do). Each matrix is
// row-major with unit column stride; c is contiguous. a and b share a dtype
// (bf16, f16 or f32); c is f32, or the inputs' dtype.
void gemm(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta,
          Stream& s);

// Number of distinct problem shapes whose algorithm is cached (for tests).
size_t gemm_cached_algorithms();

}  // namespace loom::cuda
