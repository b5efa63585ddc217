// Implementation of the shared test helpers.
#include "tests/testing.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>

#include "framework/storage.h"

namespace loom::testing {

namespace {
std::string index_str(int64_t linear, const Shape& shape) {
  std::vector<int64_t> idx(shape.size());
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    idx[d] = shape[d] ? linear % shape[d] : 0;
    linear = shape[d] ? linear / shape[d] : 0;
  }
  return shape_str(idx);
}

// Element `linear` (row-major over the view's shape) of a f64 CPU view.
double& element(Tensor& t, int64_t linear) {
  int64_t offset = t.offset();
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    offset += (linear % t.size(d)) * t.stride(d);
    linear /= t.size(d);
  }
  return static_cast<double*>(t.storage()->data())[offset];
}
}  // namespace

::testing::AssertionResult tensors_close(const Tensor& actual, const Tensor& expected, double rtol, double atol) {
  if (!actual.defined() || !expected.defined())
    return ::testing::AssertionFailure() << "undefined tensor (actual " << actual.defined() << ", expected "
                                         << expected.defined() << ")";
  if (actual.shape() != expected.shape())
    return ::testing::AssertionFailure() << "shape " << shape_str(actual.shape()) << " vs expected "
                                         << shape_str(expected.shape());
  std::vector<double> a = actual.to_vector<double>(), e = expected.to_vector<double>();
  int64_t worst = -1, failures = 0;
  double worst_excess = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    double diff = std::fabs(a[i] - e[i]);
    double allowed = atol + rtol * std::fabs(e[i]);
    bool bad = !(diff <= allowed) || std::isnan(a[i]) != std::isnan(e[i]);
    if (std::isnan(a[i]) && std::isnan(e[i])) bad = false;
    if (std::isinf(a[i]) && a[i] == e[i]) bad = false;  // equal infinities (e.g. lse of empty rows)
    if (bad) {
      ++failures;
      double excess = std::isnan(diff) ? INFINITY : diff - allowed;
      if (worst < 0 || excess > worst_excess) {
        worst = static_cast<int64_t>(i);
        worst_excess = excess;
      }
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << fmt::format(
             "{} of {} elements differ (rtol {}, atol {}); worst at {}: actual {:.10g}, expected {:.10g}, "
             "|diff| {:.3g}",
             failures, a.size(), rtol, atol, index_str(worst, actual.shape()), a[worst], e[worst],
             std::fabs(a[worst] - e[worst]));
}

Tensor random_tensor(const Shape& shape, uint64_t seed, DType dtype, double scale) {
  Tensor t = Tensor::empty(shape, dtype);
  fill_normal(t, 0.0, scale, seed, 0);
  return t;
}

Tensor random_indices(const Shape& shape, int64_t high, uint64_t seed) {
  Tensor u = Tensor::empty(shape, DType::f64);
  fill_uniform(u, 0.0, 1.0, seed, 0);
  Tensor out = Tensor::empty(shape, DType::i64);
  std::vector<double> values = u.to_vector<double>();
  int64_t* p = out.data<int64_t>();
  for (size_t i = 0; i < values.size(); ++i) p[i] = std::min<int64_t>(high - 1, static_cast<int64_t>(values[i] * high));
  return out;
}

Tensor non_contiguous(const Tensor& t) {
  LOOM_CHECK(t.dim() >= 1) << "non_contiguous needs at least one dimension";
  Shape wide = t.shape();
  wide.back() *= 2;
  Tensor buffer = Tensor::full(wide, NAN, t.dtype());
  Tensor view = buffer.slice(-1, 0, wide.back(), 2);
  view.copy_(t);
  return view;
}

::testing::AssertionResult gradcheck(const GradFn& fn, const std::vector<Tensor>& inputs,
                                     const GradCheckOptions& options) {
  std::vector<bool> check(inputs.size(), false);
  for (size_t i = 0; i < inputs.size(); ++i) {
    check[i] = inputs[i].defined() && inputs[i].dtype() == DType::f64 &&
               std::find(options.skip.begin(), options.skip.end(), i) == options.skip.end();
    if (inputs[i].defined() && is_floating(inputs[i].dtype()) && inputs[i].dtype() != DType::f64)
      return ::testing::AssertionFailure() << "gradcheck input " << i << " must be f64, got " << inputs[i].dtype();
  }
  // Analytic gradients.
  std::vector<Variable> vars;
  for (size_t i = 0; i < inputs.size(); ++i) vars.emplace_back(inputs[i], check[i]);
  std::vector<Variable> outs = fn(vars);
  std::vector<Tensor> projections;
  for (size_t k = 0; k < outs.size(); ++k)
    projections.push_back(random_tensor(outs[k].shape(), options.seed + 7919 * k, DType::f64));
  auto objective = [&](const std::vector<Variable>& o) {
    double total = 0.0;
    for (size_t k = 0; k < o.size(); ++k) {
      if (!is_floating(o[k].dtype())) continue;
      std::vector<double> v = o[k].data().to_vector<double>(), r = projections[k].to_vector<double>();
      for (size_t j = 0; j < v.size(); ++j) total += v[j] * r[j];
    }
    return total;
  };
  std::vector<Variable> roots;
  std::vector<Tensor> root_grads;
  for (size_t k = 0; k < outs.size(); ++k)
    if (outs[k].requires_grad()) {
      roots.push_back(outs[k]);
      root_grads.push_back(projections[k]);
    }
  if (roots.empty()) return ::testing::AssertionFailure() << "no output requires grad";
  run_backward(roots, root_grads);

  // Numerical gradients, perturbing the inputs in place (views included).
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!check[i]) continue;
    Tensor x = inputs[i];
    Tensor numeric = Tensor::zeros(x.shape(), DType::f64);
    double* num = numeric.data<double>();
    for (int64_t j = 0; j < x.numel(); ++j) {
      double& value = element(x, j);
      double saved = value;
      NoGradGuard no_grad;
      value = saved + options.eps;
      double plus = objective(fn(std::vector<Variable>(vars.begin(), vars.end())));
      value = saved - options.eps;
      double minus = objective(fn(std::vector<Variable>(vars.begin(), vars.end())));
      value = saved;
      num[j] = (plus - minus) / (2 * options.eps);
    }
    Tensor analytic = vars[i].grad();
    if (!analytic.defined()) analytic = Tensor::zeros(x.shape(), DType::f64);
    auto result = tensors_close(analytic, numeric, options.rtol, options.atol);
    if (!result) return ::testing::AssertionFailure() << "gradient of input " << i << " " << shape_str(x.shape())
                                                      << " (analytic vs numeric): " << result.message();
  }
  return ::testing::AssertionSuccess();
}

TempDir::TempDir(const std::string& tag) {
  std::string pattern = (std::filesystem::temp_directory_path() / (tag + "_XXXXXX")).string();
  char* made = ::mkdtemp(pattern.data());
  LOOM_CHECK(made != nullptr) << "mkdtemp " << pattern << " failed";
  path_ = made;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string gpu_skip_reason() { return cuda_unavailable_reason(); }

}  // namespace loom::testing
