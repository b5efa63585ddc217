// Helpers shared by the ops_nn tests: error-message checks, host value
// access, and a sampled finite-difference check for inputs too large for the
// full gradcheck (used to exercise the threaded kernel paths).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "framework/autograd.h"
#include "framework/error.h"
#include "tests/testing.h"

namespace loom::testing {

// Runs `fn`, expects a loom::Error whose message contains every one of `needles`.
inline ::testing::AssertionResult error_mentions(const std::function<void()>& fn,
                                                 const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const Error& e) {
    std::string message = e.what();
    for (const std::string& needle : needles)
      if (message.find(needle) == std::string::npos)
        return ::testing::AssertionFailure() << "message lacks \"" << needle << "\": " << message;
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no loom::Error thrown";
}
#define EXPECT_ERROR_MENTIONS(statement, ...) \
  EXPECT_TRUE(::loom::testing::error_mentions([&] { (void)(statement); }, __VA_ARGS__))

inline std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }
inline Tensor f64_tensor(const std::vector<double>& v, const Shape& shape) { return Tensor::from_vector(v, shape); }

// Like gradcheck, but only for `samples` random elements of each floating
// input (inputs f64, CPU, contiguous).
inline ::testing::AssertionResult spot_gradcheck(const GradFn& fn, const std::vector<Tensor>& inputs, int samples,
                                                 uint64_t seed, double rtol = 1e-5, double atol = 1e-7) {
  std::vector<Variable> vars;
  for (const Tensor& t : inputs) vars.emplace_back(t, t.dtype() == DType::f64);
  std::vector<Variable> outs = fn(vars);
  std::vector<Tensor> projections;
  std::vector<Variable> roots;
  for (size_t k = 0; k < outs.size(); ++k) {
    projections.push_back(random_tensor(outs[k].shape(), seed + 101 * k, DType::f64));
    if (outs[k].requires_grad()) roots.push_back(outs[k]);
  }
  run_backward(roots, std::vector<Tensor>(projections.begin(), projections.begin() + roots.size()));
  auto objective = [&] {
    NoGradGuard no_grad;
    std::vector<Variable> o = fn(vars);
    double total = 0.0;
    for (size_t k = 0; k < o.size(); ++k) {
      std::vector<double> v = values(o[k].data()), r = values(projections[k]);
      for (size_t j = 0; j < v.size(); ++j) total += v[j] * r[j];
    }
    return total;
  };
  const double eps = 1e-6;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].dtype() != DType::f64) continue;
    Tensor picks = random_indices({samples}, inputs[i].numel(), seed + 7 * i);
    std::vector<double> analytic = values(vars[i].grad());
    double* data = inputs[i].data<double>();
    for (int64_t j : picks.to_vector<int64_t>()) {
      double saved = data[j];
      data[j] = saved + eps;
      double plus = objective();
      data[j] = saved - eps;
      double minus = objective();
      data[j] = saved;
      double numeric = (plus - minus) / (2 * eps);
      if (!(std::fabs(analytic[j] - numeric) <= atol + rtol * std::fabs(numeric)))
        return ::testing::AssertionFailure() << "input " << i << " element " << j << ": analytic " << analytic[j]
                                             << ", numeric " << numeric;
    }
  }
  return ::testing::AssertionSuccess();
}

// Finite-difference tolerances of the attention gradchecks (f64, scores through exp).
inline GradCheckOptions attention_tolerance() {
  GradCheckOptions o;
  o.rtol = 1e-5;
  o.atol = 1e-7;
  return o;
}

}  // namespace loom::testing
