// Fused AdamW on CUDA (see adamw.h). The step factors are formed on the host
// exactly as the CPU twin forms them (double, then cast to the master's
// type); each block updates one chunk of one span (multi_tensor.cuh) with
// packs of 4 elements (16-byte loads of an fp32 master) where every pointer
// of the span allows, and element by element otherwise.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "kernels/cuda/adamw.h"
#include "kernels/cuda/multi_tensor.cuh"

namespace loom::cuda {

namespace {

constexpr int kPack = 4;
using Table = multi::SpanTable<5>;  // param, exp_avg, exp_avg_sq, compute, grad

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename T>
struct StepFactors {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps;
};

// kernels/cpu/adamw.cpp step_factors, minus the per-span decay.
template <typename T>
StepFactors<T> step_factors(const AdamWScalars& s) {
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.step));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.step));
  StepFactors<T> f;
  f.beta1 = static_cast<T>(s.beta1);
  f.one_minus_beta1 = static_cast<T>(1.0 - s.beta1);
  f.beta2 = static_cast<T>(s.beta2);
  f.one_minus_beta2 = static_cast<T>(1.0 - s.beta2);
  f.step_size = static_cast<T>(s.lr / bc1);
  f.inv_bc2_sqrt = static_cast<T>(1.0 / std::sqrt(bc2));
  f.eps = static_cast<T>(s.eps);
  return f;
}

// One element, in the CPU twin's order of operations.
template <typename T, typename G>
__device__ __forceinline__ void update(T& p, T& m, T& v, G grad, T decay, const StepFactors<T>& f) {
  const T g = convert<T>(grad);
  const T mi = add_rn(mul_rn(f.beta1, m), mul_rn(f.one_minus_beta1, g));
  const T vi = add_rn(mul_rn(f.beta2, v), mul_rn(mul_rn(f.one_minus_beta2, g), g));
  T pi = mul_rn(p, decay);
  pi = sub_rn(pi, div_rn(mul_rn(f.step_size, mi), add_rn(mul_rn(sqrt_rn(vi), f.inv_bc2_sqrt), f.eps)));
  m = mi;
  v = vi;
  p = pi;
}

// C = void: no compute copy.
template <typename T, typename G, typename C>
__global__ void __launch_bounds__(multi::kThreads) adamw_kernel(const __grid_constant__ Table table,
                                                                const StepFactors<T> f) {
  const int64_t chunk = blockIdx.x;
  const int span = multi::find_span(table, chunk);
  const int64_t n = table.numel[span];
  const int64_t begin = (chunk - table.first_chunk[span]) * multi::kChunk;
  const int64_t end = min(n, begin + multi::kChunk);
  T* p = static_cast<T*>(table.ptr[span][0]);
  T* m = static_cast<T*>(table.ptr[span][1]);
  T* v = static_cast<T*>(table.ptr[span][2]);
  const G* g = static_cast<const G*>(table.ptr[span][4]);
  const T decay = static_cast<T>(table.scalar[span]);
  [[maybe_unused]] auto* c = static_cast<std::conditional_t<std::is_void_v<C>, char, C>*>(table.ptr[span][3]);
  auto scalar_step = [&](int64_t i) {
    T pi = p[i], mi = m[i], vi = v[i];
    update(pi, mi, vi, g[i], decay, f);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (!std::is_void_v<C>) c[i] = convert<C>(pi);
  };
  if (!table.aligned[span]) {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) scalar_step(i);
    return;
  }
  for (int64_t i = begin + threadIdx.x * kPack; i < end; i += blockDim.x * kPack) {
    if (i + kPack > end) {  // the span's last, partial pack
      for (int64_t j = i; j < end; ++j) scalar_step(j);
      continue;
    }
    Pack<T, kPack> pp = *reinterpret_cast<const Pack<T, kPack>*>(p + i);
    Pack<T, kPack> mp = *reinterpret_cast<const Pack<T, kPack>*>(m + i);
    Pack<T, kPack> vp = *reinterpret_cast<const Pack<T, kPack>*>(v + i);
    const Pack<G, kPack> gp = *reinterpret_cast<const Pack<G, kPack>*>(g + i);
#pragma unroll
    for (int k = 0; k < kPack; ++k) update(pp.v[k], mp.v[k], vp.v[k], gp.v[k], decay, f);
    *reinterpret_cast<Pack<T, kPack>*>(p + i) = pp;
    *reinterpret_cast<Pack<T, kPack>*>(m + i) = mp;
    *reinterpret_cast<Pack<T, kPack>*>(v + i) = vp;
    if constexpr (!std::is_void_v<C>) {
      Pack<C, kPack> cp;
#pragma unroll
      for (int k = 0; k < kPack; ++k) cp.v[k] = convert<C>(pp.v[k]);
      *reinterpret_cast<Pack<C, kPack>*>(c + i) = cp;
    }
  }
}

void check_span(const Tensor& t, int64_t numel, const Stream& s, const char* name, size_t index) {
  LOOM_CHECK(t.defined()) << "adamw_step: span " << index << ": " << name << " is undefined";
  check_device_tensor(t, s, "adamw_step", name);
  LOOM_CHECK(t.numel() == numel) << "adamw_step: span " << index << ": " << name << " has " << t.numel()
                                 << " elements " << shape_str(t.shape()) << ", the master param has " << numel;
}

void check(const AdamWSpan& sp, const Stream& s, size_t index) {
  LOOM_CHECK(sp.param.defined()) << "adamw_step: span " << index << ": param is undefined";
  const int64_t n = sp.param.numel();
  check_span(sp.param, n, s, "param", index);
  check_span(sp.exp_avg, n, s, "exp_avg", index);
  check_span(sp.exp_avg_sq, n, s, "exp_avg_sq", index);
  check_span(sp.grad, n, s, "grad", index);
  LOOM_CHECK(sp.param.dtype() == DType::f32 || sp.param.dtype() == DType::f64)
      << "adamw_step: master param dtype " << sp.param.dtype() << " is not supported (f32, f64)";
  LOOM_CHECK(sp.exp_avg.dtype() == sp.param.dtype() && sp.exp_avg_sq.dtype() == sp.param.dtype())
      << "adamw_step: exp_avg " << sp.exp_avg.dtype() << " and exp_avg_sq " << sp.exp_avg_sq.dtype()
      << " must have the master param's dtype " << sp.param.dtype();
  LOOM_CHECK(is_floating(sp.grad.dtype())) << "adamw_step: grad dtype " << sp.grad.dtype() << " is not floating";
  if (sp.compute.defined()) {
    check_span(sp.compute, n, s, "compute copy", index);
    LOOM_CHECK(!sp.compute.shares_storage(sp.param)) << "adamw_step: the compute copy must not alias the master param";
    LOOM_CHECK(sp.compute.dtype() != DType::f64 && is_floating(sp.compute.dtype()))
        << "adamw_step: compute copy dtype " << sp.compute.dtype() << " is not supported (bf16, f16, f32)";
  }
}

template <typename T, typename G, typename C>
void launch(const Table& table, int64_t chunks, const AdamWScalars& scalars, Stream& s) {
  adamw_kernel<T, G, C><<<static_cast<unsigned>(chunks), multi::kThreads, 0, raw(s)>>>(table, step_factors<T>(scalars));
  LOOM_CUDA_CHECK(cudaGetLastError());
}

// Launches for spans[order[begin, end)), which share (master = T, grad, compute) dtypes.
template <typename T>
void run_group(std::vector<AdamWSpan>& spans, const std::vector<size_t>& order, size_t begin, size_t end,
               const AdamWScalars& scalars, Stream& s) {
  const AdamWSpan& first = spans[order[begin]];
  const DType compute = first.compute.defined() ? first.compute.dtype() : DType::u8;  // u8: none
  LOOM_DISPATCH_CUDA_FLOATING(first.grad.dtype(), G, [&] {
    auto with_compute = [&](auto tag) {
      using C = typename decltype(tag)::type;
      using CPtr = std::conditional_t<std::is_void_v<C>, char, C>;
      multi::TableBuilder<5> builder(
          [&](const Table& table, int64_t chunks) { launch<T, G, C>(table, chunks, scalars, s); });
      for (size_t k = begin; k < end; ++k) {
        AdamWSpan& sp = spans[order[k]];
        void* c = sp.compute.defined() ? sp.compute.raw_data() : nullptr;
        const bool aligned = pack_aligned<T, kPack>(sp.param.raw_data()) &&
                             pack_aligned<T, kPack>(sp.exp_avg.raw_data()) &&
                             pack_aligned<T, kPack>(sp.exp_avg_sq.raw_data()) &&
                             pack_aligned<G, kPack>(sp.grad.raw_data()) && (c == nullptr || pack_aligned<CPtr, kPack>(c));
        builder.add({sp.param.raw_data(), sp.exp_avg.raw_data(), sp.exp_avg_sq.raw_data(), c, sp.grad.raw_data()},
                    sp.param.numel(), 1.0 - scalars.lr * sp.weight_decay, static_cast<int64_t>(order[k]), aligned);
      }
      builder.flush();
    };
    switch (compute) {
      case DType::u8: return with_compute(TypeTag<void>{});
      case DType::bf16: return with_compute(TypeTag<__nv_bfloat16>{});
      case DType::f16: return with_compute(TypeTag<__half>{});
      case DType::f32: return with_compute(TypeTag<float>{});
      default: LOOM_FAIL() << "adamw_step: compute copy dtype " << compute << " is not supported (bf16, f16, f32)";
    }
  });
}

}  // namespace

void adamw_step_many(std::vector<AdamWSpan>& spans, const AdamWScalars& scalars, Stream& s) {
  LOOM_CHECK(scalars.step >= 1) << "adamw_step: step " << scalars.step << " must be >= 1 (bias correction)";
  LOOM_CHECK(scalars.beta1 >= 0.0 && scalars.beta1 < 1.0 && scalars.beta2 >= 0.0 && scalars.beta2 < 1.0)
      << "adamw_step: beta1 " << scalars.beta1 << " and beta2 " << scalars.beta2 << " must lie in [0, 1)";
  for (size_t i = 0; i < spans.size(); ++i) check(spans[i], s, i);
  // Group by (master, grad, compute) dtypes: one kernel instantiation per group.
  auto key = [&](size_t i) {
    const AdamWSpan& sp = spans[i];
    return std::make_tuple(sp.param.dtype(), sp.grad.dtype(), sp.compute.defined() ? sp.compute.dtype() : DType::u8);
  };
  std::vector<size_t> order(spans.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return key(a) < key(b); });
  for (size_t begin = 0; begin < order.size();) {
    size_t end = begin + 1;
    while (end < order.size() && key(order[end]) == key(order[begin])) ++end;
    if (spans[order[begin]].param.dtype() == DType::f32) run_group<float>(spans, order, begin, end, scalars, s);
    else run_group<double>(spans, order, begin, end, scalars, s);  // checked: f32 or f64
    begin = end;
  }
}

void adamw_step(Tensor& param, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor& compute, const Tensor& grad,
                const AdamWScalars& scalars, Stream& s) {
  std::vector<AdamWSpan> spans{AdamWSpan{param, exp_avg, exp_avg_sq, compute, grad, scalars.weight_decay}};
  adamw_step_many(spans, scalars, s);
}

}  // namespace loom::cuda
