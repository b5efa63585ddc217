// Gather / scatter-add over contiguous (V, C) tables. Ids are validated in one
// serial pass before any row is touched (no exception may leave an OpenMP
// region). The backward splits the work by channel blocks, never by ids: each
// thread owns whole columns and visits ids in order, so no two threads add to
// the same element and the summation order is fixed.
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/rows.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace loom::cpu {

namespace {

// The ids (contiguous, i64 or i32) as int64, each checked against [0, V).
std::vector<int64_t> checked_ids(const Tensor& ids, int64_t vocab, const char* op) {
  LOOM_CHECK(ids.device().is_cpu() && ids.is_contiguous()) << op << ": ids must be a contiguous CPU tensor";
  std::vector<int64_t> out(ids.numel());
  if (ids.dtype() == DType::i64) std::copy_n(ids.data<int64_t>(), out.size(), out.begin());
  else if (ids.dtype() == DType::i32) std::copy_n(ids.data<int32_t>(), out.size(), out.begin());
  else LOOM_FAIL() << op << ": ids must be i64 or i32, got " << ids.dtype();
  for (size_t i = 0; i < out.size(); ++i)
    LOOM_CHECK(out[i] >= 0 && out[i] < vocab)
        << op << ": id " << out[i] << " at position " << i << " is outside [0, " << vocab << ")";
  return out;
}

void check_table(const Tensor& table, const Tensor& rows, int64_t n, const char* op) {
  LOOM_CHECK(table.device().is_cpu() && rows.device().is_cpu()) << op << ": CPU kernel got tensors on "
                                                                << table.device() << " and " << rows.device();
  LOOM_CHECK(table.dim() == 2 && rows.dim() == 2 && table.size(1) == rows.size(1) && rows.size(0) == n)
      << op << ": table " << shape_str(table.shape()) << ", rows " << shape_str(rows.shape()) << ", " << n << " ids";
  LOOM_CHECK(table.is_contiguous() && rows.is_contiguous()) << op << ": tensors must be contiguous";
  LOOM_CHECK(table.dtype() == rows.dtype()) << op << ": dtypes differ, " << table.dtype() << " vs " << rows.dtype();
}

}  // namespace

void embedding_forward(Tensor& out, const Tensor& weight, const Tensor& ids, Stream& s) {
  (void)s;
  check_table(weight, out, ids.numel(), "embedding_forward");
  std::vector<int64_t> index = checked_ids(ids, weight.size(0), "embedding_forward");
  LOOM_DISPATCH_FLOAT(weight.dtype(), T, [&] { gather_rows(out.data<T>(), weight.data<T>(), index, weight.size(1)); });
}

void embedding_backward(Tensor& grad_weight, const Tensor& grad_out, const Tensor& ids, Stream& s) {
  (void)s;
  check_table(grad_weight, grad_out, ids.numel(), "embedding_backward");
  std::vector<int64_t> index = checked_ids(ids, grad_weight.size(0), "embedding_backward");
  LOOM_DISPATCH_FLOAT(grad_weight.dtype(), T, [&] {
    scatter_add_rows(grad_weight.data<T>(), grad_out.data<T>(), index, grad_weight.size(1));
  });
}

}  // namespace loom::cpu
