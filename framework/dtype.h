// Element types and devices. bf16 and f16 are stored as raw 16-bit patterns on
// the host; conversions round to nearest even and keep NaN/Inf.
#pragma once

#include <cstdint>
#include <cstring>
#include <ostream>
#include <string>

#include "framework/error.h"

namespace loom {

enum class DType : uint8_t { f64, f32, bf16, f16, i64, i32, u8 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
DType dtype_from_name(const std::string& name);  // throws on unknown names
bool is_floating(DType dtype);
inline std::ostream& operator<<(std::ostream& os, DType d) { return os << dtype_name(d); }

// Host-side 16-bit float types (bit containers with explicit conversions).
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float value);
  explicit operator float() const;
};
struct f16 {
  uint16_t bits = 0;
  f16() = default;
  explicit f16(float value);
  explicit operator float() const;
};

uint16_t float_to_bf16_bits(float value);
float bf16_bits_to_float(uint16_t bits);
uint16_t float_to_f16_bits(float value);
float f16_bits_to_float(uint16_t bits);

template <typename T>
struct DTypeOf;
template <> struct DTypeOf<double> { static constexpr DType value = DType::f64; };
template <> struct DTypeOf<float> { static constexpr DType value = DType::f32; };
template <> struct DTypeOf<bf16> { static constexpr DType value = DType::bf16; };
template <> struct DTypeOf<f16> { static constexpr DType value = DType::f16; };
template <> struct DTypeOf<int64_t> { static constexpr DType value = DType::i64; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::i32; };
template <> struct DTypeOf<uint8_t> { static constexpr DType value = DType::u8; };

struct Device {
  enum class Kind : uint8_t { cpu, cuda };
  Kind kind = Kind::cpu;
  int index = 0;

  static Device cpu() { return {Kind::cpu, 0}; }
  static Device cuda(int index) { return {Kind::cuda, index}; }
  static Device parse(const std::string& text);  // "cpu", "cuda", "cuda:N"
  bool is_cpu() const { return kind == Kind::cpu; }
  bool is_cuda() const { return kind == Kind::cuda; }
  std::string str() const;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};
inline std::ostream& operator<<(std::ostream& os, const Device& d) { return os << d.str(); }

// Dispatch on a floating dtype the CPU kernels support (f32, f64); throws otherwise.
#define LOOM_DISPATCH_FLOAT(dtype, scalar_t, ...)                                   \
  [&] {                                                                             \
    switch (dtype) {                                                                \
      case ::loom::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }     \
      case ::loom::DType::f64: { using scalar_t = double; return __VA_ARGS__(); }    \
      default: LOOM_FAIL() << "dtype " << (dtype) << " is not supported here (f32, f64)"; \
    }                                                                               \
  }()

// Dispatch on any dtype (bf16/f16 as the host bit containers above).
#define LOOM_DISPATCH_ALL(dtype, scalar_t, ...)                                     \
  [&] {                                                                             \
    switch (dtype) {                                                                \
      case ::loom::DType::f64: { using scalar_t = double; return __VA_ARGS__(); }    \
      case ::loom::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }     \
      case ::loom::DType::bf16: { using scalar_t = ::loom::bf16; return __VA_ARGS__(); } \
      case ::loom::DType::f16: { using scalar_t = ::loom::f16; return __VA_ARGS__(); } \
      case ::loom::DType::i64: { using scalar_t = int64_t; return __VA_ARGS__(); }   \
      case ::loom::DType::i32: { using scalar_t = int32_t; return __VA_ARGS__(); }   \
      case ::loom::DType::u8: { using scalar_t = uint8_t; return __VA_ARGS__(); }    \
    }                                                                               \
    LOOM_FAIL() << "unknown dtype";                                                 \
  }()

}  // namespace loom
