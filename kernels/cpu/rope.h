// Rotary position embedding CPU kernels, rotate-half pairing as in Hugging
// Face Llama: channel i < D/2 pairs with i + D/2, rotated by the angle
// positions[b, t] * theta^(-2i/D). The backward is the inverse rotation.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// x, y (B, T, H, D) contiguous, D even, f32 or f64; positions i64 or i32,
// contiguous, shape (T) (shared by the batch) or (B, T).
//   y_i       = x_i cos - x_{i+D/2} sin
//   y_{i+D/2} = x_{i+D/2} cos + x_i sin
void rope_forward(Tensor& y, const Tensor& x, const Tensor& positions, double theta, Stream& s);
// dx = rotation of dy by the negative angle (the transpose of the forward rotation).
void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& positions, double theta, Stream& s);

}  // namespace loom::cpu
