// Partial-attention merge on CUDA (see attention_merge.h). One warp per
// (b, row, h): every lane reads both lse values, forms the same merged lse and
// weights in fp32 (expf / log1pf, no fast-math intrinsics, so it tracks the
// CPU twin's fp32 arithmetic to a few ulp), and updates D / 32 elements of the
// row with coalesced loads; lane 0 writes the new lse after the warp has read
// the old one. The work is memory bound (one read of the partial, one
// read-modify-write of the accumulator), so no tiling beyond that.
#include "kernels/cuda/attention_merge.h"
#include "kernels/cuda/common.cuh"

namespace loom::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;

template <typename P>
__global__ void attention_merge_kernel(float* __restrict__ out, float* __restrict__ lse,
                                       const P* __restrict__ part_out, const float* __restrict__ part_lse,
                                       int64_t B, int64_t N, int64_t n, int64_t H, int64_t D, int64_t start) {
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= B * n * H) return;  // whole warps leave together
  const int64_t h = warp % H, i = (warp / H) % n, b = warp / (H * n);
  const float lp = part_lse[(b * H + h) * n + i];
  if (lp == -INFINITY) return;  // the block had no visible key for this row
  float* la_ptr = lse + (b * H + h) * N + start + i;
  const float la = *la_ptr;
  float* oa = out + ((b * N + start + i) * H + h) * D;
  const P* op = part_out + ((b * n + i) * H + h) * D;
  float merged = lp, wa = 0.f, wp = 1.f;  // first visible block of this row: take the partial
  if (la != -INFINITY) {
    merged = fmaxf(la, lp) + log1pf(expf(-fabsf(la - lp)));
    wa = expf(la - merged);
    wp = expf(lp - merged);
  }
  for (int64_t d = lane; d < D; d += 32) {
    const float p = to_float(op[d]);
    oa[d] = la == -INFINITY ? p : wa * oa[d] + wp * p;  // never reads an empty row's stale out
  }
  __syncwarp();  // every lane has read the old lse
  if (lane == 0) *la_ptr = merged;
}

}  // namespace

void attention_merge(Tensor& out_acc, Tensor& lse_acc, const Tensor& part_out, const Tensor& part_lse,
                     int64_t row_start, Stream& s) {
  const char* op = "attention_merge";
  check_device_tensor(out_acc, s, op, "out_acc");
  check_device_tensor(lse_acc, s, op, "lse_acc");
  check_device_tensor(part_out, s, op, "part_out");
  check_device_tensor(part_lse, s, op, "part_lse");
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
  LOOM_CHECK(out_acc.dtype() == DType::f32 && lse_acc.dtype() == DType::f32 && part_lse.dtype() == DType::f32)
      << op << ": out_acc, lse_acc and part_lse must be f32 (fp32 merge), got " << out_acc.dtype() << ", "
      << lse_acc.dtype() << ", " << part_lse.dtype();
  LOOM_CHECK(lse_acc.shape() == Shape({B, H, N}) && part_lse.shape() == Shape({B, H, n}))
      << op << ": lse_acc " << shape_str(lse_acc.shape()) << " and part_lse " << shape_str(part_lse.shape())
      << " must be " << shape_str({B, H, N}) << " and " << shape_str({B, H, n});
  const int64_t rows = B * n * H;
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  LOOM_DISPATCH_CUDA_FLOAT(part_out.dtype(), P, [&] {
    attention_merge_kernel<P><<<blocks, kWarpsPerBlock * 32, 0, raw(s)>>>(
        out_acc.data<float>(), lse_acc.data<float>(), static_cast<const P*>(part_out.raw_data()),
        part_lse.data<float>(), B, N, n, H, D, row_start);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace loom::cuda
