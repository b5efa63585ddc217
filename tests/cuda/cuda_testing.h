// Helpers shared by the single-GPU kernel tests (tests/cuda): the CPU and GPU
// streams, inputs rounded to a dtype, NaN-poisoned outputs and raw-byte
// uploads (optionally misaligned by one element). One copy here instead of one
// per test file; CUDA-only, so kept out of tests/testing.h.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "framework/error.h"
#include "framework/stream.h"
#include "framework/tensor.h"
#include "tests/testing.h"

namespace loom::cuda_testing {

inline Stream& cpu_stream() { return Stream::default_for(Device::cpu()); }
inline Stream& gpu_stream() { return Stream::default_for(Device::cuda(0)); }
inline Device gpu() { return Device::cuda(0); }

// Largest finite |value| of `t` (the scale an absolute tolerance is set by).
inline double max_abs(const Tensor& t) {
  double m = 0;
  for (double v : t.to_vector<double>())
    if (std::isfinite(v)) m = std::max(m, std::fabs(v));
  return m;
}

// GPU tensor (any dtype) against an f32 CPU reference: relative tolerance one
// bf16 rounding (2^-8) for bf16, else `rtol`; absolute `atol_scale` times the
// larger of 1 and the reference's largest finite magnitude.
inline ::testing::AssertionResult close_to_reference(const Tensor& gpu_tensor, const Tensor& expected, DType dtype,
                                                     double rtol, double atol_scale) {
  return testing::tensors_close(gpu_tensor.to(Device::cpu()).to(DType::f32), expected,
                                dtype == DType::bf16 ? std::ldexp(1.0, -8) : rtol,
                                atol_scale * std::max(1.0, max_abs(expected)));
}

// `fn` throws a loom::Error whose message contains `needle`.
inline void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Fresh inputs rounded to `dtype` and kept as f32 on the host.
inline Tensor random_rounded(const Shape& shape, uint64_t seed, DType dtype, double scale = 1.0) {
  return testing::random_tensor(shape, seed, DType::f32, scale).to(dtype).to(DType::f32);
}

// A CUDA tensor of `shape` and `dtype` filled with NaN on the device.
inline Tensor poisoned(const Shape& shape, DType dtype) { return Tensor::full(shape, NAN, dtype, gpu()); }

// A contiguous CUDA tensor holding `values` converted (on the host) to
// `dtype`; `misalign` shifts its start by one element inside a larger buffer.
inline Tensor upload(const Tensor& values, DType dtype, bool misalign = false) {
  Tensor host = values.to(dtype).contiguous();
  Tensor buffer = Tensor::empty({host.numel() + 1}, dtype, gpu());
  Tensor t = buffer.narrow(0, misalign ? 1 : 0, host.numel()).view(host.shape());
  t.copy_(host);  // same dtype, both contiguous: a raw copy
  return t;
}

// A CUDA tensor of `shape` and `dtype` filled with NaN (or 123 for integers),
// uploaded like `upload` (so `misalign` works as there).
inline Tensor poisoned_upload(const Shape& shape, DType dtype, bool misalign = false) {
  return upload(Tensor::full(shape, is_floating(dtype) ? NAN : 123.0, DType::f64), dtype, misalign);
}

// Host copy of a contiguous CUDA tensor (raw bytes), as f64 for comparison.
inline Tensor download(const Tensor& t) { return t.to(Device::cpu()).to(DType::f64); }

}  // namespace loom::cuda_testing
