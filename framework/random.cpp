// Host implementation of the counter-based fills (CUDA tensors are filled on
// the host and copied; the values are identical by construction).
#include "framework/random.h"

#include <cmath>

namespace loom {

double normal_from_bits(uint32_t a, uint32_t b) {
  // u1 in (0, 1] so log(u1) is finite; u2 in [0, 1).
  double u1 = (static_cast<double>(a >> 8) + 1.0) / 16777216.0;
  double u2 = static_cast<double>(b >> 8) / 16777216.0;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

namespace {
template <typename Fn>
void fill_with(Tensor& t, uint64_t seed, uint64_t counter, Fn&& value_of_words) {
  LOOM_CHECK(t.defined()) << "fill of an undefined tensor";
  LOOM_CHECK(is_floating(t.dtype())) << "random fill needs a floating dtype, got " << t.dtype();
  Tensor host = Tensor::empty(t.shape(), DType::f64);
  double* p = host.data<double>();
  int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    uint32_t words[4];
    philox4x32(seed, counter + static_cast<uint64_t>(i), 0, words);
    p[i] = value_of_words(words);
  }
  t.copy_(host);
}
}  // namespace

void fill_uniform(Tensor& t, double low, double high, uint64_t seed, uint64_t counter) {
  fill_with(t, seed, counter, [&](const uint32_t* w) { return low + (high - low) * uniform_from_bits(w[0]); });
}

void fill_normal(Tensor& t, double mean, double stddev, uint64_t seed, uint64_t counter) {
  fill_with(t, seed, counter, [&](const uint32_t* w) { return mean + stddev * normal_from_bits(w[0], w[1]); });
}

void fill_uniform(Tensor& t, double low, double high, Generator& gen) {
  fill_uniform(t, low, high, gen.seed(), gen.advance(static_cast<uint64_t>(t.numel())));
}
void fill_normal(Tensor& t, double mean, double stddev, Generator& gen) {
  fill_normal(t, mean, stddev, gen.seed(), gen.advance(static_cast<uint64_t>(t.numel())));
}

Tensor randn(const Shape& shape, Generator& gen, DType dtype, Device device) {
  Tensor t = Tensor::empty(shape, dtype, device);
  fill_normal(t, 0.0, 1.0, gen);
  return t;
}
Tensor rand(const Shape& shape, Generator& gen, DType dtype, Device device) {
  Tensor t = Tensor::empty(shape, dtype, device);
  fill_uniform(t, 0.0, 1.0, gen);
  return t;
}

}  // namespace loom
