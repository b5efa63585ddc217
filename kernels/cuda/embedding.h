// Embedding CUDA kernels with the CPU twin's contract (kernels/cpu/embedding.h).
// The backward is deterministic: token slots are stably sorted by id (CUB
// radix sort), and each distinct id's gradient row is summed in token order by
// one block, so repeated ids add up in the same order on every run.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// out (N, C) = weight (V, C) rows at ids (N, i64 or i32). Ids outside [0, V)
// are an error (checked on the device; the error names the first bad id and V).
void embedding_forward(Tensor& out, const Tensor& weight, const Tensor& ids, Stream& s);
// grad_weight (V, C) f32 += grad_out (N, C) rows at ids.
void embedding_backward(Tensor& grad_weight, const Tensor& grad_out, const Tensor& ids, Stream& s);

}  // namespace loom::cuda
