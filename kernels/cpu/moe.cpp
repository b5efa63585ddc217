// CPU kernels of the MoE dispatch (see moe.h). Inputs are contiguous; index
// validation runs serially before any OpenMP region (no exception may leave
// one). index_add_rows splits work by column blocks, never by indices, so no
// two threads write the same element and the summation order is fixed.
#include "kernels/cpu/moe.h"
#include "kernels/cpu/rows.h"

#include "kernels/cpu/matmul.h"
#include "kernels/moh_gate_row.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace loom::cpu {

namespace {

// The index (contiguous i64, CPU) as a vector, each entry checked against [0, n).
std::vector<int64_t> checked_index(const Tensor& index, int64_t n, const char* op) {
  LOOM_CHECK(index.device().is_cpu() && index.is_contiguous() && index.dtype() == DType::i64)
      << op << ": index must be a contiguous CPU i64 tensor, got " << index.dtype() << " "
      << shape_str(index.shape());
  std::vector<int64_t> out(index.data<int64_t>(), index.data<int64_t>() + index.numel());
  for (size_t i = 0; i < out.size(); ++i)
    LOOM_CHECK(out[i] >= 0 && out[i] < n) << op << ": index " << out[i] << " at position " << i
                                          << " is outside [0, " << n << ")";
  return out;
}

// Both 2-D, contiguous, CPU, same dtype and width; `rows` has one row per index.
void check_rows(const Tensor& table, const Tensor& rows, int64_t m, const char* op) {
  LOOM_CHECK(table.device().is_cpu() && rows.device().is_cpu())
      << op << ": CPU kernel got tensors on " << table.device() << " and " << rows.device();
  LOOM_CHECK(table.dim() == 2 && rows.dim() == 2 && table.size(1) == rows.size(1) && rows.size(0) == m)
      << op << ": table " << shape_str(table.shape()) << ", rows " << shape_str(rows.shape()) << ", " << m
      << " indices";
  LOOM_CHECK(table.is_contiguous() && rows.is_contiguous()) << op << ": tensors must be contiguous";
  LOOM_CHECK(table.dtype() == rows.dtype()) << op << ": dtypes differ, " << table.dtype() << " vs " << rows.dtype();
}

void check_matrix(const Tensor& x, const char* op) {
  LOOM_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2)
      << op << ": expected a contiguous CPU (N, K) tensor, got " << shape_str(x.shape()) << " on " << x.device();
}

}  // namespace

void index_select_rows(Tensor& out, const Tensor& x, const Tensor& index, Stream& s) {
  (void)s;
  check_rows(x, out, index.numel(), "index_select_rows");
  std::vector<int64_t> idx = checked_index(index, x.size(0), "index_select_rows");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { gather_rows(out.data<T>(), x.data<T>(), idx, x.size(1)); });
}

void index_add_rows(Tensor& out, const Tensor& rows, const Tensor& index, Stream& s) {
  (void)s;
  check_rows(out, rows, index.numel(), "index_add_rows");
  std::vector<int64_t> idx = checked_index(index, out.size(0), "index_add_rows");
  LOOM_DISPATCH_FLOAT(out.dtype(), T, [&] { scatter_add_rows(out.data<T>(), rows.data<T>(), idx, out.size(1)); });
}

void logsumexp_forward(Tensor& lse, const Tensor& x, Stream& s) {
  (void)s;
  check_matrix(x, "logsumexp_forward");
  LOOM_CHECK(lse.is_contiguous() && lse.numel() == x.size(0) && lse.dtype() == x.dtype())
      << "logsumexp_forward: lse " << shape_str(lse.shape()) << " " << lse.dtype() << " for x "
      << shape_str(x.shape()) << " " << x.dtype();
  int64_t n = x.size(0), k = x.size(1);
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    const T* in = x.data<T>();
    T* out = lse.data<T>();
    for (int64_t i = 0; i < n; ++i) {
      const T* row = in + i * k;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < k; ++j) m = std::max(m, static_cast<double>(row[j]));
      if (std::isinf(m)) {  // empty row or all -inf / +inf: the sum is exp(m)
        out[i] = static_cast<T>(m);
        continue;
      }
      double sum = 0.0;
      for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(row[j]) - m);
      out[i] = static_cast<T>(m + std::log(sum));
    }
  });
}

void logsumexp_backward(Tensor& grad_x, const Tensor& grad_lse, const Tensor& x, const Tensor& lse, Stream& s) {
  (void)s;
  check_matrix(x, "logsumexp_backward");
  check_matrix(grad_x, "logsumexp_backward");
  LOOM_CHECK(grad_x.shape() == x.shape() && grad_lse.numel() == x.size(0) && lse.numel() == x.size(0) &&
             grad_lse.is_contiguous() && lse.is_contiguous() && grad_x.dtype() == x.dtype() &&
             grad_lse.dtype() == x.dtype() && lse.dtype() == x.dtype())
      << "logsumexp_backward: grad_x " << shape_str(grad_x.shape()) << ", grad_lse " << shape_str(grad_lse.shape())
      << ", x " << shape_str(x.shape()) << ", lse " << shape_str(lse.shape());
  int64_t n = x.size(0), k = x.size(1);
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    const T *in = x.data<T>(), *l = lse.data<T>(), *g = grad_lse.data<T>();
    T* out = grad_x.data<T>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) {
        double p = std::isinf(static_cast<double>(l[i])) ? 0.0 : std::exp(static_cast<double>(in[i * k + j] - l[i]));
        out[i * k + j] = static_cast<T>(static_cast<double>(g[i]) * p);
      }
  });
}

namespace {

void check_grouped(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets, int64_t out_rows,
                   int64_t out_cols, const char* op) {
  LOOM_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2) && x.is_contiguous() && w.is_contiguous() &&
             x.dtype() == w.dtype())
      << op << ": x " << shape_str(x.shape()) << " " << x.dtype() << ", w " << shape_str(w.shape()) << " "
      << w.dtype() << " (need contiguous (S, In) and (E, Out, In) of one dtype)";
  LOOM_CHECK(static_cast<int64_t>(offsets.size()) == w.size(0) + 1 && offsets.front() == 0 &&
             offsets.back() == x.size(0))
      << op << ": " << offsets.size() << " offsets for " << w.size(0) << " experts and " << x.size(0) << " rows";
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    LOOM_CHECK(offsets[e] <= offsets[e + 1]) << op << ": offsets decrease at expert " << e;
  LOOM_CHECK(out_rows == x.size(0) && out_cols == w.size(1)) << op << ": output (" << out_rows << ", " << out_cols
                                                             << ") for x " << shape_str(x.shape()) << ", w "
                                                             << shape_str(w.shape());
}

}  // namespace

void grouped_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                            Stream& s) {
  check_grouped(x, w, offsets, y.size(0), y.size(1), "grouped_linear_forward");
  LOOM_CHECK(y.is_contiguous() && y.dtype() == x.dtype()) << "grouped_linear_forward: y must be contiguous " << x.dtype();
  for (int64_t e = 0; e < w.size(0); ++e) {
    int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    Tensor ye = y.narrow(0, offsets[e], n);                       // (n, Out)
    gemm(ye, x.narrow(0, offsets[e], n), w.select(0, e), false, true, 1.0, 0.0, s);
  }
}

void grouped_linear_backward(Tensor& grad_x, Tensor& grad_w, const Tensor& grad_y, const Tensor& x, const Tensor& w,
                             const std::vector<int64_t>& offsets, Stream& s) {
  check_grouped(x, w, offsets, grad_y.size(0), grad_y.size(1), "grouped_linear_backward");
  LOOM_CHECK(grad_y.is_contiguous() && grad_y.dtype() == x.dtype())
      << "grouped_linear_backward: grad_y must be contiguous " << x.dtype();
  LOOM_CHECK(!grad_x.defined() || (grad_x.shape() == x.shape() && grad_x.is_contiguous()))
      << "grouped_linear_backward: grad_x " << shape_str(grad_x.shape()) << " for x " << shape_str(x.shape());
  LOOM_CHECK(!grad_w.defined() || (grad_w.shape() == w.shape() && grad_w.is_contiguous()))
      << "grouped_linear_backward: grad_w " << shape_str(grad_w.shape()) << " for w " << shape_str(w.shape());
  if (grad_w.defined()) grad_w.zero_();
  for (int64_t e = 0; e < w.size(0); ++e) {
    int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    Tensor gy = grad_y.narrow(0, offsets[e], n);  // (n, Out)
    if (grad_x.defined()) {
      Tensor gx = grad_x.narrow(0, offsets[e], n);  // (n, In)
      gemm(gx, gy, w.select(0, e), false, false, 1.0, 0.0, s);
    }
    if (grad_w.defined()) {
      Tensor gw = grad_w.select(0, e);  // (Out, In)
      gemm(gw, gy, x.narrow(0, offsets[e], n), true, false, 1.0, 0.0, s);
    }
  }
}

namespace {

// Shared checks of the two top-k entries; returns (rows, columns).
std::pair<int64_t, int64_t> check_topk(const Tensor& scores, int64_t k, const char* op) {
  check_matrix(scores, op);
  const int64_t n = scores.size(0), e = scores.size(1);
  LOOM_CHECK(k >= 1 && k <= e) << op << ": k = " << k << " must lie in [1, " << e << "]";
  return {n, e};
}

// For each row i of in (n, e): the row's k first columns under `before(row, a, b)`
// (a strict weak order) into order[0, k), then fn(i, order).
template <typename T, typename Before, typename Fn>
void for_each_top_k(const T* in, int64_t n, int64_t e, int64_t k, Before before, Fn fn) {
  std::vector<int64_t> order(static_cast<size_t>(e));
  for (int64_t i = 0; i < n; ++i) {
    const T* row = in + i * e;
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return before(row, a, b); });
    fn(i, order);
  }
}

}  // namespace

void topk_rows(Tensor& indices, const Tensor& scores, int64_t k, Stream& s) {
  (void)s;
  const auto [n, e] = check_topk(scores, k, "topk_rows");
  LOOM_CHECK(indices.is_contiguous() && indices.dtype() == DType::i64 && indices.shape() == (Shape{n, k}))
      << "topk_rows: indices must be contiguous i64 (" << n << ", " << k << "), got " << indices.dtype() << " "
      << shape_str(indices.shape());
  LOOM_DISPATCH_FLOAT(scores.dtype(), T, [&] {
    const T* in = scores.data<T>();
    for (int64_t i = 0; i < n * e; ++i)
      LOOM_CHECK(!std::isnan(static_cast<double>(in[i]))) << "topk_rows: score (" << i / e << ", " << i % e
                                                           << ") is NaN";
    int64_t* out = indices.data<int64_t>();
    // Descending score, then ascending column: a strict weak order, so the result is deterministic.
    for_each_top_k(
        in, n, e, k, [](const T* row, int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); },
        [&](int64_t i, const std::vector<int64_t>& order) { std::copy_n(order.begin(), k, out + i * k); });
  });
}

void topk_mask_rows(Tensor& mask, const Tensor& scores, int64_t k, Stream& s) {
  (void)s;
  const auto [n, e] = check_topk(scores, k, "topk_mask_rows");
  LOOM_CHECK(mask.is_contiguous() && mask.dtype() == scores.dtype() && mask.shape() == scores.shape())
      << "topk_mask_rows: mask must be contiguous " << scores.dtype() << " " << shape_str(scores.shape()) << ", got "
      << mask.dtype() << " " << shape_str(mask.shape());
  LOOM_DISPATCH_FLOAT(scores.dtype(), T, [&] {
    T* out = mask.data<T>();
    // Numbers before NaN, then descending score, then ascending column (the CUDA kernel's order).
    auto before = [](const T* row, int64_t a, int64_t b) {
      const bool an = std::isnan(static_cast<double>(row[a])), bn = std::isnan(static_cast<double>(row[b]));
      if (an != bn) return bn;
      return (!an && row[a] > row[b]) || ((an || row[a] == row[b]) && a < b);
    };
    for_each_top_k(scores.data<T>(), n, e, k, before, [&](int64_t i, const std::vector<int64_t>& order) {
      std::fill_n(out + i * e, e, T(0));
      for (int64_t j = 0; j < k; ++j) out[i * e + order[static_cast<size_t>(j)]] = T(1);
    });
  });
}

void moh_gate_rows(Tensor& gate, const Tensor& p, const Tensor& mask, const Tensor& z, int64_t shared, int64_t k,
                   Stream& s) {
  (void)s;
  moh::check_gate_operands(gate, p, mask, z, shared, k, "moh_gate_rows");
  const int64_t n = p.size(0), e = p.size(1), zc = shared > 0 ? z.size(1) : 0;
  LOOM_DISPATCH_FLOAT(p.dtype(), T, [&] {
    for (int64_t i = 0; i < n; ++i)
      moh::gate_row(gate.data<T>() + i * (shared + e), p.data<T>() + i * e, mask.data<T>() + i * e,
                    shared > 0 ? z.data<T>() + i * zc : nullptr, e, shared, k);
  });
}

void moh_gate_rows_backward(Tensor& dp, Tensor& dz, const Tensor& dgate, const Tensor& p, const Tensor& mask,
                            const Tensor& z, int64_t shared, int64_t k, Stream& s) {
  (void)s;
  moh::check_gate_operands(dgate, p, mask, z, shared, k, "moh_gate_rows_backward");
  LOOM_CHECK(dp.is_contiguous() && dp.shape() == p.shape() && dp.dtype() == p.dtype() &&
             (shared == 0 || (dz.is_contiguous() && dz.shape() == z.shape() && dz.dtype() == z.dtype())))
      << "moh_gate_rows_backward: dp must be like p " << shape_str(p.shape()) << " and dz like z";
  const int64_t n = p.size(0), e = p.size(1), zc = shared > 0 ? z.size(1) : 0;
  LOOM_DISPATCH_FLOAT(p.dtype(), T, [&] {
    for (int64_t i = 0; i < n; ++i)
      moh::gate_row_backward(dp.data<T>() + i * e, shared > 0 ? dz.data<T>() + i * zc : nullptr,
                             dgate.data<T>() + i * (shared + e), p.data<T>() + i * e, mask.data<T>() + i * e,
                             shared > 0 ? z.data<T>() + i * zc : nullptr, e, shared, k);
  });
}

}  // namespace loom::cpu
