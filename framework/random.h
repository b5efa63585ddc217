// Counter-based random numbers (Philox-4x32-10). Element i of a fill gets a
// value that depends only on (seed, counter + i), so the same seed gives the
// same numbers on every device and for every way of splitting a tensor across
// ranks: a rank filling elements [a, b) of a global tensor passes counter + a.
#pragma once

#include <array>
#include <cstdint>

#include "framework/host_device.h"
#include "framework/tensor.h"

namespace loom {

// One Philox-4x32-10 block: 4 random 32-bit words for (key, counter).
LOOM_HOST_DEVICE inline void philox4x32(uint64_t key, uint64_t counter_lo, uint64_t counter_hi, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = static_cast<uint32_t>(p1);
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// A stream of random numbers: a seed and a running counter. Each fill
// consumes `numel` counters, so successive fills never overlap.
class Generator {
 public:
  explicit Generator(uint64_t seed = 0, uint64_t counter = 0) : seed_(seed), counter_(counter) {}
  uint64_t seed() const { return seed_; }
  uint64_t counter() const { return counter_; }
  void set_state(uint64_t seed, uint64_t counter) { seed_ = seed; counter_ = counter; }
  // Reserves `n` counters and returns the first.
  uint64_t advance(uint64_t n) {
    uint64_t first = counter_;
    counter_ += n;
    return first;
  }

 private:
  uint64_t seed_;
  uint64_t counter_;
};

// Stateless fills: element i uses counter `counter + i` (row-major over t's shape).
void fill_uniform(Tensor& t, double low, double high, uint64_t seed, uint64_t counter);
void fill_normal(Tensor& t, double mean, double stddev, uint64_t seed, uint64_t counter);
// Generator fills (advance the generator by t.numel()).
void fill_uniform(Tensor& t, double low, double high, Generator& gen);
void fill_normal(Tensor& t, double mean, double stddev, Generator& gen);

Tensor randn(const Shape& shape, Generator& gen, DType dtype = DType::f32, Device device = Device::cpu());
Tensor rand(const Shape& shape, Generator& gen, DType dtype = DType::f32, Device device = Device::cpu());

// Uniform in [0, 1) from one 32-bit word (24 significant bits), and a standard
// normal from two words (Box-Muller), both exactly reproducible in float.
LOOM_HOST_DEVICE inline float uniform_from_bits(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}
double normal_from_bits(uint32_t a, uint32_t b);

}  // namespace loom
