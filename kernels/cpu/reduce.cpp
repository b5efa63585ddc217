// Sum over all elements / over one dim. The input is walked as (outer, n,
// inner) so the innermost loop runs over contiguous memory whichever dim is
// reduced; outer rows are independent and go to OpenMP threads when large.
#include "kernels/cpu/reduce.h"

#include <vector>

namespace loom::cpu {

namespace {

void check_operands(const Tensor& out, const Tensor& x, int64_t expected_numel, const char* op) {
  LOOM_CHECK(out.device().is_cpu() && x.device().is_cpu())
      << op << ": CPU kernel got tensors on " << x.device() << " and " << out.device();
  LOOM_CHECK(x.is_contiguous() && out.is_contiguous())
      << op << ": input " << shape_str(x.shape()) << " and output " << shape_str(out.shape()) << " must be contiguous";
  LOOM_CHECK(out.dtype() == x.dtype()) << op << ": output dtype " << out.dtype() << ", input " << x.dtype();
  LOOM_CHECK(out.numel() == expected_numel) << op << ": output " << shape_str(out.shape()) << " for input "
                                            << shape_str(x.shape()) << ", expected " << expected_numel
                                            << " elements";
}

template <typename T>
void sum_rows(T* out, const T* x, int64_t outer, int64_t n, int64_t inner) {
#pragma omp parallel for schedule(static) if (outer > 1 && outer * n * inner > (int64_t{1} << 16))
  for (int64_t o = 0; o < outer; ++o) {
    std::vector<double> acc(inner, 0.0);
    for (int64_t j = 0; j < n; ++j) {
      const T* row = x + (o * n + j) * inner;
      for (int64_t i = 0; i < inner; ++i) acc[i] += static_cast<double>(row[i]);
    }
    for (int64_t i = 0; i < inner; ++i) out[o * inner + i] = static_cast<T>(acc[i]);
  }
}

}  // namespace

void sum_all(Tensor& out, const Tensor& x, Stream& s) {
  (void)s;
  check_operands(out, x, 1, "sum_all");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    const T* px = x.data<T>();
    double acc = 0.0;
    for (int64_t i = 0, n = x.numel(); i < n; ++i) acc += static_cast<double>(px[i]);
    *out.data<T>() = static_cast<T>(acc);
  });
}

void sum_dim(Tensor& out, const Tensor& x, int64_t dim, Stream& s) {
  (void)s;
  dim = wrap_dim(dim, x.dim());
  int64_t outer = 1, inner = 1, n = x.size(dim);
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  check_operands(out, x, outer * inner, "sum_dim");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { sum_rows(out.data<T>(), x.data<T>(), outer, n, inner); });
}

}  // namespace loom::cpu
