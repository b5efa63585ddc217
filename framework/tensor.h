// Tensor: a value type over shared Storage — shape, strides and offset (in
// elements), dtype and device. Views (view, slice, narrow, transpose, permute,
// expand, unsqueeze) share storage; kernels take contiguous inputs unless they
// say otherwise, so callers use contiguous() where needed.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "framework/dtype.h"
#include "framework/storage.h"

namespace loom {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);  // "(2, 3, 4)"
int64_t shape_numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);

class Stream;

class Tensor {
 public:
  Tensor() = default;  // undefined tensor

  // ---- creation (memory on `device`, uninitialized for empty) ----
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor scalar(double value, DType dtype = DType::f32, Device device = Device::cpu());  // shape ()
  // 0, 1, ..., n-1
  static Tensor arange(int64_t n, DType dtype = DType::i64, Device device = Device::cpu());
  // Copies host values into a new CPU tensor of the matching dtype.
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape);

  // ---- metadata ----
  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t offset() const { return offset_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t stride(int64_t d) const;
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool is_contiguous() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  bool shares_storage(const Tensor& other) const { return storage_ && storage_ == other.storage_; }

  // ---- data access (pointer to the first element, offset applied) ----
  void* raw_data() const;
  template <typename T>
  T* data() const {
    LOOM_CHECK(DTypeOf<T>::value == dtype_) << "data<" << dtype_name(DTypeOf<T>::value) << ">() on a " << dtype_
                                            << " tensor";
    return static_cast<T*>(raw_data());
  }
  // Value of a one-element tensor (any dtype, any device), as double.
  double item() const;
  // Contiguous host copy of all elements converted to T.
  template <typename T>
  std::vector<T> to_vector() const;

  // ---- views (share storage) ----
  Tensor view(const Shape& shape) const;  // needs contiguous; one -1 allowed
  Tensor reshape(const Shape& shape) const;  // view when contiguous, else a copy
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;  // [start, end)
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor select(int64_t dim, int64_t index) const;  // drops `dim`
  Tensor transpose(int64_t dim0, int64_t dim1) const;
  Tensor permute(const std::vector<int64_t>& order) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;  // dim must have size 1
  Tensor expand(const Shape& shape) const;  // broadcast size-1 dims with stride 0
  Tensor flatten() const { return reshape({numel()}); }

  // ---- copies ----
  Tensor contiguous() const;  // self when already contiguous
  Tensor clone() const;       // always a new contiguous tensor
  Tensor to(DType dtype) const;
  Tensor to(Device device) const;
  // Copies `src` (same shape; any strides, dtype, device) into this tensor's elements.
  void copy_(const Tensor& src);
  void fill_(double value);
  void zero_() { fill_(0.0); }

  std::string str(int64_t max_per_dim = 6) const;  // printing with shape/dtype/device

 private:
  friend Tensor make_tensor(std::shared_ptr<Storage>, Shape, Shape, int64_t, DType);
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  Shape strides_;
  int64_t offset_ = 0;
  DType dtype_ = DType::f32;
  Device device_;
};

// A tensor over existing storage with explicit layout (bounds are checked).
Tensor make_tensor(std::shared_ptr<Storage> storage, Shape shape, Shape strides, int64_t offset, DType dtype);

std::ostream& operator<<(std::ostream& os, const Tensor& t);

// Normalizes a possibly negative dimension index against `ndim` (throws when out of range).
int64_t wrap_dim(int64_t dim, int64_t ndim);

// Checks that two tensors have the same shape, naming `what` in the error.
void check_same_shape(const Tensor& a, const Tensor& b, const char* what);

// The broadcast shape of two shapes (numpy rules); throws naming both shapes.
Shape broadcast_shapes(const Shape& a, const Shape& b);

}  // namespace loom
