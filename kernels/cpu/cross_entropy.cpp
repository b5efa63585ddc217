// Cross-entropy CPU kernels. Targets are validated (and counted) in one serial
// pass before the threaded row loop, so errors can be thrown with the row and
// value. Row losses are summed serially in double after the parallel loop, so
// the result does not depend on the thread count.
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/checks.h"

#include <cmath>
#include <limits>
#include <vector>

namespace loom::cpu {

namespace {

// Targets as i64 (copied from i32 when needed), validated against [0, V) or
// ignore_index; `count` gets the number of rows that are not ignored.
std::vector<int64_t> read_targets(const Tensor& targets, int64_t rows, int64_t vocab, int64_t ignore_index,
                                  const char* op, int64_t& count) {
  check_operand(targets, op, "targets");
  LOOM_CHECK(targets.dtype() == DType::i64 || targets.dtype() == DType::i32)
      << op << ": targets must be i64 or i32, got " << targets.dtype();
  LOOM_CHECK(targets.shape() == Shape{rows})
      << op << ": targets shape " << shape_str(targets.shape()) << ", expected " << shape_str({rows}) << " for "
      << rows << " rows of logits";
  std::vector<int64_t> values = targets.to_vector<int64_t>();
  count = 0;
  for (int64_t n = 0; n < rows; ++n) {
    int64_t t = values[n];
    if (t == ignore_index) continue;
    LOOM_CHECK(t >= 0 && t < vocab) << op << ": target " << t << " at row " << n << " is outside [0, " << vocab
                                    << ") (ignore_index " << ignore_index << ")";
    ++count;
  }
  return values;
}

template <typename T>
void cross_entropy_forward_kernel(T* loss, T* lse, const T* logits, const int64_t* targets, int64_t rows,
                                  int64_t vocab, int64_t ignore_index, double divisor) {
  std::vector<double> row_loss(rows, 0.0);
#pragma omp parallel for schedule(static) if (rows * vocab > 32768)
  for (int64_t n = 0; n < rows; ++n) {
    const T* x = logits + n * vocab;
    double row_max = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < vocab; ++c) row_max = std::fmax(row_max, static_cast<double>(x[c]));
    double total = 0.0;
    for (int64_t c = 0; c < vocab; ++c) total += std::exp(static_cast<double>(x[c]) - row_max);
    double row_lse = row_max + std::log(total);
    lse[n] = static_cast<T>(row_lse);
    if (targets[n] != ignore_index) row_loss[n] = row_lse - static_cast<double>(x[targets[n]]);
  }
  double sum = 0.0;
  for (int64_t n = 0; n < rows; ++n) sum += row_loss[n];
  *loss = static_cast<T>(divisor > 0 ? sum / divisor : 0.0);
}

template <typename T>
void cross_entropy_backward_kernel(T* dlogits, const T* logits, const T* lse, const int64_t* targets, int64_t rows,
                                   int64_t vocab, int64_t ignore_index, double grad_scale) {
#pragma omp parallel for schedule(static) if (rows * vocab > 32768)
  for (int64_t n = 0; n < rows; ++n) {
    T* dx = dlogits + n * vocab;
    if (targets[n] == ignore_index) {
      for (int64_t c = 0; c < vocab; ++c) dx[c] = T(0);
      continue;
    }
    const T* x = logits + n * vocab;
    double row_lse = static_cast<double>(lse[n]);
    for (int64_t c = 0; c < vocab; ++c)
      dx[c] = static_cast<T>(std::exp(static_cast<double>(x[c]) - row_lse) * grad_scale);
    dx[targets[n]] = static_cast<T>(static_cast<double>(dx[targets[n]]) - grad_scale);
  }
}

}  // namespace

void cross_entropy_forward(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int64_t ignore_index, bool mean, Stream& s) {
  (void)s;
  const char* op = "cross_entropy_forward";
  check_operand(logits, op, "logits");
  LOOM_CHECK(logits.dim() == 2) << op << ": logits must be (N, V), got shape " << shape_str(logits.shape());
  int64_t rows = logits.size(0), vocab = logits.size(1), count = 0;
  std::vector<int64_t> target_values = read_targets(targets, rows, vocab, ignore_index, op, count);
  check_operand(loss, op, "loss");
  check_operand(lse, op, "lse");
  check_shape(loss, {}, logits.dtype(), op, "loss");
  check_shape(lse, {rows}, logits.dtype(), op, "lse");
  double divisor = mean ? static_cast<double>(count) : 1.0;
  LOOM_DISPATCH_FLOAT(logits.dtype(), T, [&] {
    cross_entropy_forward_kernel<T>(loss.data<T>(), lse.data<T>(), logits.data<T>(), target_values.data(), rows, vocab,
                                    ignore_index, divisor);
  });
}

void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, int64_t ignore_index, bool mean, Stream& s) {
  (void)s;
  const char* op = "cross_entropy_backward";
  check_operand(logits, op, "logits");
  LOOM_CHECK(logits.dim() == 2) << op << ": logits must be (N, V), got shape " << shape_str(logits.shape());
  int64_t rows = logits.size(0), vocab = logits.size(1), count = 0;
  std::vector<int64_t> target_values = read_targets(targets, rows, vocab, ignore_index, op, count);
  check_operand(dlogits, op, "dlogits");
  check_operand(dloss, op, "dloss");
  check_operand(lse, op, "lse");
  check_shape(dlogits, logits.shape(), logits.dtype(), op, "dlogits");
  check_shape(dloss, {}, logits.dtype(), op, "dloss");
  check_shape(lse, {rows}, logits.dtype(), op, "lse");
  LOOM_DISPATCH_FLOAT(logits.dtype(), T, [&] {
    double g = static_cast<double>(*dloss.data<T>());
    double grad_scale = mean ? (count > 0 ? g / static_cast<double>(count) : 0.0) : g;
    cross_entropy_backward_kernel<T>(dlogits.data<T>(), logits.data<T>(), lse.data<T>(), target_values.data(), rows,
                                     vocab, ignore_index, grad_scale);
  });
}

}  // namespace loom::cpu
