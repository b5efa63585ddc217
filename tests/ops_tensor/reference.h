// Plain-loop references for the tensor-op tests (f64, index arithmetic only,
// no kernels) and a check that an error message names the offending values.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "framework/error.h"
#include "framework/tensor.h"

namespace loom::testing {

// Multi-index of element `linear` of a row-major `shape`.
inline std::vector<int64_t> unravel(int64_t linear, const Shape& shape) {
  std::vector<int64_t> idx(shape.size());
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    idx[d] = linear % shape[d];
    linear /= shape[d];
  }
  return idx;
}

// Row-major position in `shape` of the element that index `idx` of a broadcast
// result (idx may have more leading dims) reads: size-1 dims read element 0.
inline int64_t broadcast_position(const std::vector<int64_t>& idx, const Shape& shape) {
  size_t lead = idx.size() - shape.size();
  int64_t pos = 0;
  for (size_t d = 0; d < shape.size(); ++d) pos = pos * shape[d] + (shape[d] == 1 ? 0 : idx[lead + d]);
  return pos;
}

// Element-wise fn(a, b) with numpy broadcasting, as f64.
inline Tensor reference_binary(const Tensor& a, const Tensor& b, const std::function<double(double, double)>& fn) {
  Shape out_shape = broadcast_shapes(a.shape(), b.shape());
  std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>(), out(shape_numel(out_shape));
  for (size_t i = 0; i < out.size(); ++i) {
    std::vector<int64_t> idx = unravel(static_cast<int64_t>(i), out_shape);
    out[i] = fn(va[broadcast_position(idx, a.shape())], vb[broadcast_position(idx, b.shape())]);
  }
  return Tensor::from_vector(out, out_shape);
}

// a (..., M, K) @ b (..., K, N) with broadcast batch dims, triple loop in f64.
inline Tensor reference_matmul(const Tensor& a, const Tensor& b) {
  int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  Shape a_batch(a.shape().begin(), a.shape().end() - 2), b_batch(b.shape().begin(), b.shape().end() - 2);
  Shape batch = broadcast_shapes(a_batch, b_batch);
  std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>();
  int64_t count = shape_numel(batch);
  std::vector<double> out(count * m * n, 0.0);
  for (int64_t t = 0; t < count; ++t) {
    std::vector<int64_t> idx = unravel(t, batch);
    int64_t pa = broadcast_position(idx, a_batch) * m * k, pb = broadcast_position(idx, b_batch) * k * n;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0.0;
        for (int64_t p = 0; p < k; ++p) acc += va[pa + i * k + p] * vb[pb + p * n + j];
        out[(t * m + i) * n + j] = acc;
      }
  }
  Shape out_shape = batch;
  out_shape.push_back(m);
  out_shape.push_back(n);
  return Tensor::from_vector(out, out_shape);
}

// Passes when `fn` throws loom::Error and the message contains every part.
inline ::testing::AssertionResult throws_mentioning(const std::function<void()>& fn,
                                                    const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const std::string& part : parts)
      if (msg.find(part) == std::string::npos)
        return ::testing::AssertionFailure() << "error message lacks \"" << part << "\": " << msg;
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-loom exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "no error thrown";
}
#define EXPECT_ERROR_MENTIONS(statement, ...) \
  EXPECT_TRUE(::loom::testing::throws_mentioning([&] { (void)(statement); }, {__VA_ARGS__}))

}  // namespace loom::testing
