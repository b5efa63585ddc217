// Element-wise kernels on CUDA (see elementwise.h). Two kernel shapes serve
// every op: a flat one over contiguous operands (grid-stride over packs of 8
// elements — one 16-byte vector for 16-bit types, two for f32 — then a scalar
// tail; used only when every pointer is aligned to its pack) and a strided one
// that maps each output index to operand offsets through a coalesced layout.
// The strided one also runs by packs when the innermost dim is a multiple of 8
// and every operand is contiguous or broadcast along it (a per-row gate times
// (B, T, H, D), a bias): one offset computation and whole-vector loads per 8
// elements (the per-head gate product of 32M bf16 elements took 150 us
// element by element on an H100).
#include <cmath>

#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/kernel_utils.cuh"

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kPack = 8;              // elements per thread per step on the flat path
constexpr int64_t kMaxBlocks = 8192;  // grid-stride beyond this many blocks
constexpr int64_t kMax32 = 0xffffffffll;  // strided paths index in 32 bits up to this many elements

// ---- op functors (C = math type: float, or double for f64) ----
struct AddOp { template <typename C> __device__ C operator()(C a, C b) const { return a + b; } };
struct SubOp { template <typename C> __device__ C operator()(C a, C b) const { return a - b; } };
struct MulOp { template <typename C> __device__ C operator()(C a, C b) const { return a * b; } };
struct DivOp { template <typename C> __device__ C operator()(C a, C b) const { return a / b; } };
// Products and sums rounded separately (no fused multiply-add), as the CPU twin computes them.
struct ScaleOp {
  double alpha, beta;
  template <typename C> __device__ C operator()(C x, C) const {
    return add_rn(mul_rn(static_cast<C>(alpha), x), static_cast<C>(beta));
  }
};
struct AxpyOp {  // a = y, b = x
  double alpha;
  template <typename C> __device__ C operator()(C y, C x) const { return add_rn(y, mul_rn(static_cast<C>(alpha), x)); }
};

template <typename C>
__device__ __forceinline__ C sigmoid_of(C x) {
  if constexpr (std::is_same_v<C, double>) return 1.0 / (1.0 + exp(-x));
  else return 1.f / (1.f + expf(-x));
}
struct SigmoidOp { template <typename C> __device__ C operator()(C x, C) const { return sigmoid_of(x); } };
struct SigmoidBackwardOp {  // a = dy, b = y
  template <typename C> __device__ C operator()(C dy, C y) const { return dy * y * (C(1) - y); }
};
struct SiluOp { template <typename C> __device__ C operator()(C x, C) const { return x * sigmoid_of(x); } };
struct SiluBackwardOp {  // a = dy, b = x
  template <typename C> __device__ C operator()(C dy, C x) const {
    C sg = sigmoid_of(x);
    return dy * sg * (C(1) + x * (C(1) - sg));
  }
};

// out[i] = op(a[i], b[i]) over contiguous operands (b null for unary ops: op gets 0).
// Math in acc_t<O>; a may alias out.
template <typename O, typename A, typename B, typename Op>
__global__ void flat_kernel(O* out, const A* a, const B* b, int64_t n, int64_t packs, Op op) {
  using C = acc_t<O>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t p = first; p < packs; p += stride) {
    const int64_t base = p * kPack;
    Pack<A, kPack> va = *reinterpret_cast<const Pack<A, kPack>*>(a + base);
    Pack<B, kPack> vb{};
    if (b != nullptr) vb = *reinterpret_cast<const Pack<B, kPack>*>(b + base);
    Pack<O, kPack> vo;
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      vo.v[j] = convert<O>(op(convert<C>(va.v[j]), b != nullptr ? convert<C>(vb.v[j]) : C(0)));
    *reinterpret_cast<Pack<O, kPack>*>(out + base) = vo;
  }
  for (int64_t i = packs * kPack + first; i < n; i += stride)
    out[i] = convert<O>(op(convert<C>(a[i]), b != nullptr ? convert<C>(b[i]) : C(0)));
}

// Same with offsets from a layout of three operands (out, a, b).
template <typename O, typename A, typename B, typename Op, typename I>
__global__ void strided_kernel(O* out, const A* a, const B* b, int64_t n, StridedLayout<3> layout, Op op) {
  using C = acc_t<O>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    int64_t off[3];
    layout.offsets(static_cast<I>(i), off);
    out[off[0]] = convert<O>(op(convert<C>(a[off[1]]), b != nullptr ? convert<C>(b[off[2]]) : C(0)));
  }
}

// The strided kernel by packs of kPack along the innermost dim: operand k is
// contiguous there (vector loads) unless bit k of `broadcast` says its inner
// stride is 0 (one element for the whole pack). `packs` = n / kPack.
template <typename O, typename A, typename B, typename Op, typename I>
__global__ void strided_pack_kernel(O* out, const A* a, const B* b, int64_t packs, StridedLayout<3> layout,
                                    unsigned broadcast, Op op) {
  using C = acc_t<O>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs; p += stride) {
    int64_t off[3];
    layout.offsets(static_cast<I>(p * kPack), off);
    Pack<A, kPack> va;
    Pack<B, kPack> vb{};
    if (broadcast & 2u) {
#pragma unroll
      for (int j = 0; j < kPack; ++j) va.v[j] = a[off[1]];
    } else {
      va = *reinterpret_cast<const Pack<A, kPack>*>(a + off[1]);
    }
    if (b != nullptr) {
      if (broadcast & 4u) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) vb.v[j] = b[off[2]];
      } else {
        vb = *reinterpret_cast<const Pack<B, kPack>*>(b + off[2]);
      }
    }
    Pack<O, kPack> vo;
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      vo.v[j] = convert<O>(op(convert<C>(va.v[j]), b != nullptr ? convert<C>(vb.v[j]) : C(0)));
    *reinterpret_cast<Pack<O, kPack>*>(out + off[0]) = vo;
  }
}

// Bits of the operands (1 out, 2 a, 4 b) broadcast along the layout's innermost dim,
// or -1 when the pack kernel cannot run: the innermost size is not a multiple of
// kPack, an operand's inner stride is neither 1 nor 0, or a contiguous operand's
// packs are not aligned (its pointer, or an outer stride not a multiple of kPack).
template <typename O, typename A, typename B>
int pack_broadcast(const StridedLayout<3>& l, const void* out, const void* a, const void* b) {
  if (l.ndim == 0 || l.sizes[l.ndim - 1] % kPack != 0) return -1;
  const void* ptrs[3] = {out, a, b};
  const bool aligned[3] = {pack_aligned<O, kPack>(out), pack_aligned<A, kPack>(a),
                           b == nullptr || pack_aligned<B, kPack>(b)};
  int bits = 0;
  for (int k = 0; k < 3; ++k) {
    if (ptrs[k] == nullptr) continue;
    const int64_t inner = l.strides[k][l.ndim - 1];
    if (inner == 0 && k > 0) {
      bits |= 1 << k;
      continue;
    }
    if (inner != 1 || !aligned[k]) return -1;
    for (int d = 0; d + 1 < l.ndim; ++d)
      if (l.strides[k][d] % kPack != 0) return -1;
  }
  return bits;
}

template <typename O, typename A, typename B, typename Op>
void launch_flat(O* out, const A* a, const B* b, int64_t n, Op op, Stream& s) {
  if (n == 0) return;
  const bool aligned = pack_aligned<O, kPack>(out) && pack_aligned<A, kPack>(a) &&
                       (b == nullptr || pack_aligned<B, kPack>(b));
  const int64_t packs = aligned ? n / kPack : 0;
  const int64_t blocks = grid_size(packs + (n - packs * kPack), kThreads, kMaxBlocks);
  flat_kernel<O, A, B, Op><<<blocks, kThreads, 0, raw(s)>>>(out, a, b, n, packs, op);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

// out contiguous of `shape`; a and b strided views of `shape` (b may be undefined).
template <typename O, typename A, typename B, typename Op>
void launch_strided(const Tensor& out, const Tensor& a, const Tensor& b, Op op, Stream& s, const char* name) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const Shape& sb = b.defined() ? b.strides() : a.strides();
  StridedLayout<3> layout = make_layout<3>(out.shape(), {out.strides(), a.strides(), sb}, name);
  const void* bp = b.defined() ? b.raw_data() : nullptr;
  const int bits = pack_broadcast<O, A, B>(layout, out.raw_data(), a.raw_data(), bp);
  if (bits >= 0) {
    const int64_t packs = n / kPack;
    auto go_packs = [&](auto index_tag) {
      strided_pack_kernel<O, A, B, Op, decltype(index_tag)>
          <<<grid_size(packs, kThreads, kMaxBlocks), kThreads, 0, raw(s)>>>(
              static_cast<O*>(out.raw_data()), static_cast<const A*>(a.raw_data()), static_cast<const B*>(bp), packs,
              layout, static_cast<unsigned>(bits), op);
    };
    if (n <= kMax32) go_packs(uint32_t{});
    else go_packs(int64_t{});
    LOOM_CUDA_CHECK(cudaGetLastError());
    return;
  }
  auto go = [&](auto index_tag) {
    strided_kernel<O, A, B, Op, decltype(index_tag)><<<grid_size(n, kThreads, kMaxBlocks), kThreads, 0, raw(s)>>>(
        static_cast<O*>(out.raw_data()), static_cast<const A*>(a.raw_data()),
        b.defined() ? static_cast<const B*>(b.raw_data()) : nullptr, n, layout, op);
  };
  if (n <= kMax32) go(uint32_t{});
  else go(int64_t{});
  LOOM_CUDA_CHECK(cudaGetLastError());
}

// Runs op over out = op(a, b) picking the flat path when a (and b) are contiguous.
template <typename O, typename A, typename B, typename Op>
void run(const Tensor& out, const Tensor& a, const Tensor& b, Op op, Stream& s, const char* name) {
  if (a.is_contiguous() && (!b.defined() || b.is_contiguous()))
    launch_flat<O, A, B, Op>(static_cast<O*>(out.raw_data()), static_cast<const A*>(a.raw_data()),
                             b.defined() ? static_cast<const B*>(b.raw_data()) : nullptr, out.numel(), op, s);
  else
    launch_strided<O, A, B, Op>(out, a, b, op, s, name);
}

void check_on_device(const Tensor& t, const Stream& s, const char* op, const char* name) {
  LOOM_CHECK(t.defined() && t.device().is_cuda() && t.device() == s.device())
      << op << ": " << name << " must be on " << s.device() << (t.defined() ? ", is on " + t.device().str() : "");
}

void check_output(const Tensor& out, const Shape& shape, DType dtype, const Stream& s, const char* op,
                  const char* name) {
  check_device_tensor(out, s, op, name);
  LOOM_CHECK(out.shape() == shape && out.dtype() == dtype)
      << op << ": " << name << " " << shape_str(out.shape()) << " " << out.dtype() << ", expected "
      << shape_str(shape) << " " << dtype;
}

// Same-shape contiguous unary/binary activation ops: out = op(a, b).
template <typename Op>
void activation(Tensor& out, const Tensor& a, const Tensor* b, Op op, Stream& s, const char* name) {
  check_device_tensor(a, s, name, "input");
  if (b != nullptr) check_output(*b, a.shape(), a.dtype(), s, name, "second input");
  check_output(out, a.shape(), a.dtype(), s, name, "output");
  LOOM_DISPATCH_CUDA_FLOATING(a.dtype(), T, [&] {
    launch_flat<T, T, T, Op>(static_cast<T*>(out.raw_data()), static_cast<const T*>(a.raw_data()),
                             b != nullptr ? static_cast<const T*>(b->raw_data()) : nullptr, a.numel(), op, s);
  });
}

// ---- copy / fill ----

// Elements per thread of a conversion: a 16-byte vector of the narrower type.
template <typename D, typename S>
constexpr int kCastPack = 16 / static_cast<int>(sizeof(D) < sizeof(S) ? sizeof(D) : sizeof(S));

template <typename D, typename S>
__global__ void cast_flat_kernel(D* dst, const S* src, int64_t n, int64_t packs) {
  constexpr int N = kCastPack<D, S>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t p = first; p < packs; p += stride) {
    Pack<S, N> in = *reinterpret_cast<const Pack<S, N>*>(src + p * N);
    Pack<D, N> out;
#pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = convert<D>(in.v[j]);
    *reinterpret_cast<Pack<D, N>*>(dst + p * N) = out;
  }
  for (int64_t i = packs * N + first; i < n; i += stride) dst[i] = convert<D>(src[i]);
}

template <typename D, typename S, typename I>
__global__ void cast_strided_kernel(D* dst, const S* src, int64_t n, StridedLayout<2> layout) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    int64_t off[2];
    layout.offsets(static_cast<I>(i), off);
    dst[off[0]] = convert<D>(src[off[1]]);
  }
}

template <typename T>
__global__ void fill_flat_kernel(T* out, T value, int64_t n, int64_t packs) {
  constexpr int N = kVec<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  Pack<T, N> v;
#pragma unroll
  for (int j = 0; j < N; ++j) v.v[j] = value;
  for (int64_t p = first; p < packs; p += stride) *reinterpret_cast<Pack<T, N>*>(out + p * N) = v;
  for (int64_t i = packs * N + first; i < n; i += stride) out[i] = value;
}

template <typename T>
__global__ void fill_strided_kernel(T* out, T value, int64_t n, StridedLayout<1> layout) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    int64_t off[1];
    layout.offsets(i, off);  // fills are rare on strided views: one 64-bit variant
    out[off[0]] = value;
  }
}

// The host's from_double (framework/tensor.cpp) for the CUDA element types.
template <typename T>
T value_as(double v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}

}  // namespace

void binary(Tensor& out, const Tensor& a, const Tensor& b, BinaryOp op, Stream& s) {
  const char* name = "binary";
  check_on_device(a, s, name, "a");
  check_on_device(b, s, name, "b");
  LOOM_CHECK(a.dtype() == b.dtype()) << "binary op: dtypes differ, " << a.dtype() << " vs " << b.dtype();
  const Shape shape = broadcast_shapes(a.shape(), b.shape());
  check_output(out, shape, a.dtype(), s, name, "out");
  const Tensor ea = a.shape() == shape ? a : a.expand(shape), eb = b.shape() == shape ? b : b.expand(shape);
  LOOM_DISPATCH_CUDA_FLOATING(a.dtype(), T, [&] {
    switch (op) {
      case BinaryOp::add: return run<T, T, T>(out, ea, eb, AddOp{}, s, name);
      case BinaryOp::sub: return run<T, T, T>(out, ea, eb, SubOp{}, s, name);
      case BinaryOp::mul: return run<T, T, T>(out, ea, eb, MulOp{}, s, name);
      case BinaryOp::div: return run<T, T, T>(out, ea, eb, DivOp{}, s, name);
    }
    LOOM_FAIL() << "binary: unknown op " << static_cast<int>(op);
  });
}

void scale(Tensor& out, const Tensor& x, double alpha, double beta, Stream& s) {
  check_on_device(x, s, "scale", "x");
  check_output(out, x.shape(), x.dtype(), s, "scale", "out");
  LOOM_DISPATCH_CUDA_FLOATING(x.dtype(), T, [&] { run<T, T, T>(out, x, Tensor(), ScaleOp{alpha, beta}, s, "scale"); });
}

void axpy(Tensor& y, const Tensor& x, double alpha, Stream& s) {
  check_on_device(x, s, "axpy", "x");
  check_device_tensor(y, s, "axpy", "y");
  LOOM_CHECK(y.shape() == x.shape()) << "axpy: y " << shape_str(y.shape()) << " and x " << shape_str(x.shape())
                                     << " differ";
  LOOM_DISPATCH_CUDA_FLOATING(y.dtype(), Y, [&] {
    LOOM_DISPATCH_CUDA_FLOATING(x.dtype(), X, [&] { run<Y, Y, X>(y, y, x, AxpyOp{alpha}, s, "axpy"); });
  });
}

void sigmoid_forward(Tensor& y, const Tensor& x, Stream& s) { activation(y, x, nullptr, SigmoidOp{}, s, "sigmoid_forward"); }
void sigmoid_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s) {
  activation(dx, dy, &y, SigmoidBackwardOp{}, s, "sigmoid_backward");
}
void silu_forward(Tensor& y, const Tensor& x, Stream& s) { activation(y, x, nullptr, SiluOp{}, s, "silu_forward"); }
void silu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Stream& s) {
  activation(dx, dy, &x, SiluBackwardOp{}, s, "silu_backward");
}

void copy_cast(Tensor& dst, const Tensor& src, Stream& s) {
  check_on_device(dst, s, "copy_cast", "dst");
  check_on_device(src, s, "copy_cast", "src");
  LOOM_CHECK(dst.shape() == src.shape()) << "copy_cast: dst " << shape_str(dst.shape()) << " and src "
                                         << shape_str(src.shape()) << " differ";
  const int64_t n = dst.numel();
  if (n == 0) return;
  LOOM_DISPATCH_CUDA_ALL(dst.dtype(), D, [&] {
    LOOM_DISPATCH_CUDA_ALL(src.dtype(), S, [&] {
      D* d = static_cast<D*>(dst.raw_data());
      const S* p = static_cast<const S*>(src.raw_data());
      if (dst.is_contiguous() && src.is_contiguous()) {
        constexpr int N = kCastPack<D, S>;
        const bool aligned = pack_aligned<D, N>(d) && pack_aligned<S, N>(p);
        const int64_t packs = aligned ? n / N : 0;
        cast_flat_kernel<D, S><<<grid_size(packs + (n - packs * N), kThreads, kMaxBlocks), kThreads, 0, raw(s)>>>(
            d, p, n, packs);
      } else {
        StridedLayout<2> layout = make_layout<2>(dst.shape(), {dst.strides(), src.strides()}, "copy_cast");
        if (n <= kMax32)
          cast_strided_kernel<D, S, uint32_t><<<grid_size(n, kThreads, kMaxBlocks), kThreads, 0, raw(s)>>>(d, p, n, layout);
        else
          cast_strided_kernel<D, S, int64_t><<<grid_size(n, kThreads, kMaxBlocks), kThreads, 0, raw(s)>>>(d, p, n, layout);
      }
      LOOM_CUDA_CHECK(cudaGetLastError());
    });
  });
}

void fill(Tensor& out, double value, Stream& s) {
  check_on_device(out, s, "fill", "out");
  const int64_t n = out.numel();
  if (n == 0) return;
  LOOM_DISPATCH_CUDA_ALL(out.dtype(), T, [&] {
    T* o = static_cast<T*>(out.raw_data());
    const T v = value_as<T>(value);
    if (out.is_contiguous()) {
      const int64_t packs = pack_aligned<T, kVec<T>>(o) ? n / kVec<T> : 0;
      fill_flat_kernel<T><<<grid_size(packs + (n - packs * kVec<T>), kThreads, kMaxBlocks), kThreads, 0, raw(s)>>>(
          o, v, n, packs);
    } else {
      StridedLayout<1> layout = make_layout<1>(out.shape(), {out.strides()}, "fill");
      fill_strided_kernel<T><<<grid_size(n, kThreads, kMaxBlocks), kThreads, 0, raw(s)>>>(o, v, n, layout);
    }
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace loom::cuda
