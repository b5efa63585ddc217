// SwiGLU forward/backward on CUDA (see activation.h). Each thread handles one
// 16-byte vector of every operand; elements past the last full vector (or all
// of them, when a pointer is not 16-byte aligned) take the scalar path.
#include "kernels/cuda/activation.h"
#include "kernels/cuda/common.cuh"

namespace loom::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

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

}  // namespace loom::cuda
