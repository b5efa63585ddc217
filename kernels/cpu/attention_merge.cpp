// CPU twin of the partial-attention merge (see attention_merge.h): one loop
// over (b, h, row), the merged weights computed once per row in the tensors'
// dtype (f32 merges in fp32 as the GPU does; f64 in double for the gradient
// checks of the sequence-parallel attentions).
#include "kernels/cpu/attention_merge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/checks.h"

namespace loom::cpu {

namespace {

template <typename T>
void merge_kernel(T* out, T* lse, const T* part_out, const T* part_lse, int64_t B, int64_t N, int64_t n, int64_t H,
                  int64_t D, int64_t start) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < n; ++i) {
        const T lp = part_lse[(b * H + h) * n + i];
        if (lp == neg_inf) continue;  // the block had no visible key for this row
        T& la = lse[(b * H + h) * N + start + i];
        T* oa = out + ((b * N + start + i) * H + h) * D;
        const T* op = part_out + ((b * n + i) * H + h) * D;
        if (la == neg_inf) {  // first visible block of this row
          std::copy(op, op + D, oa);
          la = lp;
          continue;
        }
        const T merged = std::max(la, lp) + std::log1p(std::exp(-std::abs(la - lp)));
        const T wa = std::exp(la - merged), wp = std::exp(lp - merged);
        for (int64_t d = 0; d < D; ++d) oa[d] = wa * oa[d] + wp * op[d];
        la = merged;
      }
}

}  // namespace

void attention_merge(Tensor& out_acc, Tensor& lse_acc, const Tensor& part_out, const Tensor& part_lse,
                     int64_t row_start, Stream& s) {
  (void)s;
  const char* op = "attention_merge";
  check_operand(out_acc, op, "out_acc");
  check_operand(lse_acc, op, "lse_acc");
  check_operand(part_out, op, "part_out");
  check_operand(part_lse, op, "part_lse");
  LOOM_CHECK(out_acc.dim() == 4 && part_out.dim() == 4)
      << op << ": out_acc " << shape_str(out_acc.shape()) << " and part_out " << shape_str(part_out.shape())
      << " must be (B, N, H, D) and (B, n, H, D)";
  const int64_t B = out_acc.size(0), N = out_acc.size(1), H = out_acc.size(2), D = out_acc.size(3);
  const int64_t n = part_out.size(1);
  LOOM_CHECK(part_out.size(0) == B && part_out.size(2) == H && part_out.size(3) == D)
      << op << ": part_out " << shape_str(part_out.shape()) << " does not match out_acc "
      << shape_str(out_acc.shape()) << " in B, H or D";
  LOOM_CHECK(row_start >= 0 && row_start + n <= N)
      << op << ": rows [" << row_start << ", " << row_start + n << ") are outside the " << N << " accumulator rows";
  check_shape(lse_acc, {B, H, N}, out_acc.dtype(), op, "lse_acc");
  check_shape(part_out, {B, n, H, D}, out_acc.dtype(), op, "part_out");
  check_shape(part_lse, {B, H, n}, out_acc.dtype(), op, "part_lse");
  LOOM_DISPATCH_FLOAT(out_acc.dtype(), T, [&] {
    merge_kernel<T>(out_acc.data<T>(), lse_acc.data<T>(), part_out.data<T>(), part_lse.data<T>(), B, N, n, H, D,
                    row_start);
  });
}

}  // namespace loom::cpu
