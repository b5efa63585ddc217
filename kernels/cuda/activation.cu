// SwiGLU and the sigmoid output gate, forward and backward, on CUDA (see
// activation.h). Each thread handles one 16-byte vector of every operand;
// elements past the last full vector (or all of them, when a pointer is not
// 16-byte aligned) take the scalar path. The gate with a span > 1 (one z per
// row of x) runs its backward a warp per row, summing dy * x in fp32.
#include "kernels/cuda/activation.h"
#include "kernels/cuda/common.cuh"

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;

// SwiGLU math in fp32 on one element.
struct SwigluForward {
  __device__ __forceinline__ void operator()(float gate, float up, float, float& out, float&) const {
    out = gate * sigmoidf(gate) * up;
  }
};
struct SwigluBackward {
  __device__ __forceinline__ void operator()(float gate, float up, float dout, float& dgate, float& dup) const {
    float sg = sigmoidf(gate);
    dgate = dout * up * sg * (1.f + gate * (1.f - sg));
    dup = dout * gate * sg;
  }
};

// The element-wise sigmoid gate (span 1): inputs x, z (, dy).
struct GateForward {
  __device__ __forceinline__ void operator()(float x, float z, float, float& y, float&) const { y = x * sigmoidf(z); }
};
struct GateBackward {
  __device__ __forceinline__ void operator()(float x, float z, float dy, float& dx, float& dz) const {
    const float g = sigmoidf(z);
    dx = dy * g;
    dz = dy * x * g * (1.f - g);
  }
};

// Up to three inputs and two outputs (unused ones null). Threads below
// `vectors` load and store one 16-byte vector of each operand; the others take
// one element each of the scalar tail starting at vectors * kVec.
template <typename T, typename Op>
__global__ void elementwise_kernel(T* o1, T* o2, const T* i1, const T* i2, const T* i3, int64_t n, int64_t vectors,
                                   Op op) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < vectors) {
    const int64_t base = t * kVec<T>;
    Vec16<T> a = *reinterpret_cast<const Vec16<T>*>(i1 + base), b = *reinterpret_cast<const Vec16<T>*>(i2 + base), c{};
    if (i3 != nullptr) c = *reinterpret_cast<const Vec16<T>*>(i3 + base);
    Vec16<T> r1, r2;
#pragma unroll
    for (int j = 0; j < kVec<T>; ++j) {
      float x1 = 0.f, x2 = 0.f;
      op(to_float(a.v[j]), to_float(b.v[j]), i3 != nullptr ? to_float(c.v[j]) : 0.f, x1, x2);
      r1.v[j] = from_float<T>(x1);
      r2.v[j] = from_float<T>(x2);
    }
    *reinterpret_cast<Vec16<T>*>(o1 + base) = r1;
    if (o2 != nullptr) *reinterpret_cast<Vec16<T>*>(o2 + base) = r2;
    return;
  }
  const int64_t i = vectors * kVec<T> + (t - vectors);
  if (i >= n) return;
  float x1 = 0.f, x2 = 0.f;
  op(to_float(i1[i]), to_float(i2[i]), i3 != nullptr ? to_float(i3[i]) : 0.f, x1, x2);
  o1[i] = from_float<T>(x1);
  if (o2 != nullptr) o2[i] = from_float<T>(x2);
}

template <typename T, typename Op>
void launch(T* o1, T* o2, const T* i1, const T* i2, const T* i3, int64_t n, Op op, Stream& s) {
  if (n == 0) return;
  bool aligned = vectorizable<T>(kVec<T>, {o1, o2, i1, i2, i3});
  int64_t vectors = aligned ? n / kVec<T> : 0;
  int64_t threads_needed = vectors + (n - vectors * kVec<T>);
  int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  elementwise_kernel<T, Op><<<blocks, kThreads, 0, raw(s)>>>(o1, o2, i1, i2, i3, n, vectors, op);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

// y = x * sigmoid(z[i / span]) for span > 1: a 16-byte vector per thread when `vec` (span a multiple of
// the vector, every pointer aligned), else an element per thread.
template <typename T>
__global__ void gate_rows_forward_kernel(T* y, const T* x, const T* z, int64_t n, int64_t span, bool vec) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (vec) {
    const int64_t base = t * kVec<T>;
    if (base >= n) return;
    const float g = sigmoidf(to_float(z[base / span]));
    const Vec16<T> a = *reinterpret_cast<const Vec16<T>*>(x + base);
    Vec16<T> r;
#pragma unroll
    for (int j = 0; j < kVec<T>; ++j) r.v[j] = from_float<T>(to_float(a.v[j]) * g);
    *reinterpret_cast<Vec16<T>*>(y + base) = r;
    return;
  }
  if (t < n) y[t] = from_float<T>(to_float(x[t]) * sigmoidf(to_float(z[t / span])));
}

// A warp per row r of `span` elements: dx = dy * g, dz[r] = g (1 - g) sum(dy * x), g = sigmoid(z[r]).
template <typename T>
__global__ void gate_rows_backward_kernel(T* dx, T* dz, const T* dy, const T* x, const T* z, int64_t rows,
                                          int64_t span, bool vec) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;  // warp-uniform
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const float g = sigmoidf(to_float(z[r]));
  const int64_t base = r * span;
  float sum = 0.f;
  if (vec) {
    for (int64_t v = base + lane * kVec<T>; v < base + span; v += 32 * kVec<T>) {
      const Vec16<T> a = *reinterpret_cast<const Vec16<T>*>(dy + v), b = *reinterpret_cast<const Vec16<T>*>(x + v);
      Vec16<T> d;
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) {
        const float dyj = to_float(a.v[j]);
        sum += dyj * to_float(b.v[j]);
        d.v[j] = from_float<T>(dyj * g);
      }
      *reinterpret_cast<Vec16<T>*>(dx + v) = d;
    }
  } else {
    for (int64_t i = base + lane; i < base + span; i += 32) {
      const float dyi = to_float(dy[i]);
      sum += dyi * to_float(x[i]);
      dx[i] = from_float<T>(dyi * g);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) dz[r] = from_float<T>(sum * g * (1.f - g));
}

void check_same(const Tensor& t, const Tensor& like, const Stream& s, const char* op, const char* name) {
  check_device_tensor(t, s, op, name);
  LOOM_CHECK(t.shape() == like.shape() && t.dtype() == like.dtype())
      << op << ": " << name << " " << shape_str(t.shape()) << " " << t.dtype() << " differs from "
      << shape_str(like.shape()) << " " << like.dtype();
}

}  // namespace

void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up, Stream& s) {
  check_device_tensor(gate, s, "swiglu_forward", "gate");
  check_same(up, gate, s, "swiglu_forward", "up");
  check_same(out, gate, s, "swiglu_forward", "out");
  LOOM_DISPATCH_CUDA_FLOAT(gate.dtype(), T, [&] {
    launch<T>(static_cast<T*>(out.raw_data()), nullptr, static_cast<const T*>(gate.raw_data()),
              static_cast<const T*>(up.raw_data()), nullptr, gate.numel(), SwigluForward{}, s);
  });
}

void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up, Stream& s) {
  check_device_tensor(gate, s, "swiglu_backward", "gate");
  check_same(up, gate, s, "swiglu_backward", "up");
  check_same(dout, gate, s, "swiglu_backward", "dout");
  check_same(dgate, gate, s, "swiglu_backward", "dgate");
  check_same(dup, gate, s, "swiglu_backward", "dup");
  LOOM_DISPATCH_CUDA_FLOAT(gate.dtype(), T, [&] {
    launch<T>(static_cast<T*>(dgate.raw_data()), static_cast<T*>(dup.raw_data()),
              static_cast<const T*>(gate.raw_data()), static_cast<const T*>(up.raw_data()),
              static_cast<const T*>(dout.raw_data()), gate.numel(), SwigluBackward{}, s);
  });
}

namespace {

// z must hold one element per `span` elements of x, with x's dtype.
void check_gate(const Tensor& x, const Tensor& z, int64_t span, const Stream& s, const char* op) {
  check_device_tensor(x, s, op, "x");
  check_device_tensor(z, s, op, "z");
  LOOM_CHECK(span >= 1 && z.numel() * span == x.numel())
      << op << ": z " << shape_str(z.shape()) << " with span " << span << " does not cover x " << shape_str(x.shape());
  LOOM_CHECK(z.dtype() == x.dtype()) << op << ": z dtype " << z.dtype() << " differs from x " << x.dtype();
}

}  // namespace

void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& z, int64_t span, Stream& s) {
  check_gate(x, z, span, s, "sigmoid_gate_forward");
  check_same(y, x, s, "sigmoid_gate_forward", "y");
  const int64_t n = x.numel();
  if (n == 0) return;
  LOOM_DISPATCH_CUDA_FLOAT(x.dtype(), T, [&] {
    T* py = static_cast<T*>(y.raw_data());
    const T* px = static_cast<const T*>(x.raw_data());
    const T* pz = static_cast<const T*>(z.raw_data());
    if (span == 1) return launch<T>(py, nullptr, px, pz, nullptr, n, GateForward{}, s);
    const bool vec = vectorizable<T>(span, {py, px});
    const int64_t threads = vec ? n / kVec<T> : n;
    gate_rows_forward_kernel<T><<<(threads + kThreads - 1) / kThreads, kThreads, 0, raw(s)>>>(py, px, pz, n, span, vec);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void sigmoid_gate_backward(Tensor& dx, Tensor& dz, const Tensor& dy, const Tensor& x, const Tensor& z, int64_t span,
                           Stream& s) {
  check_gate(x, z, span, s, "sigmoid_gate_backward");
  check_same(dy, x, s, "sigmoid_gate_backward", "dy");
  check_same(dx, x, s, "sigmoid_gate_backward", "dx");
  check_same(dz, z, s, "sigmoid_gate_backward", "dz");
  const int64_t n = x.numel(), rows = z.numel();
  if (n == 0) return;
  LOOM_DISPATCH_CUDA_FLOAT(x.dtype(), T, [&] {
    T* pdx = static_cast<T*>(dx.raw_data());
    T* pdz = static_cast<T*>(dz.raw_data());
    const T* pdy = static_cast<const T*>(dy.raw_data());
    const T* px = static_cast<const T*>(x.raw_data());
    const T* pz = static_cast<const T*>(z.raw_data());
    if (span == 1) return launch<T>(pdx, pdz, px, pz, pdy, n, GateBackward{}, s);
    const bool vec = vectorizable<T>(span, {pdx, pdy, px});
    const int64_t warps_per_block = kThreads / 32;
    gate_rows_backward_kernel<T><<<(rows + warps_per_block - 1) / warps_per_block, kThreads, 0, raw(s)>>>(
        pdx, pdz, pdy, px, pz, rows, span, vec);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace loom::cuda
