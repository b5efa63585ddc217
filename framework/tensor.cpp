// Tensor layout logic, views, strided copies with dtype conversion, printing.
// On CUDA, element-wise copies (non-contiguous views, casts) and fills run as
// device kernels of the Tensor layer (framework/cuda_copy.cu) on the device's
// default stream; transfers between host and device move contiguous bytes and
// do any relayout or cast on whichever side holds the strided tensor.
#include "framework/tensor.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>

#include "framework/cuda_runtime.h"
#include "framework/stream.h"

namespace loom {

std::string shape_str(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

int64_t wrap_dim(int64_t dim, int64_t ndim) {
  int64_t wrapped = dim < 0 ? dim + ndim : dim;
  LOOM_CHECK(wrapped >= 0 && wrapped < ndim) << "dimension " << dim << " out of range for a " << ndim << "-d tensor";
  return wrapped;
}

void check_same_shape(const Tensor& a, const Tensor& b, const char* what) {
  LOOM_CHECK(a.shape() == b.shape()) << what << ": shapes differ, " << shape_str(a.shape()) << " vs "
                                     << shape_str(b.shape());
}

Shape broadcast_shapes(const Shape& a, const Shape& b) {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    LOOM_CHECK(da == db || da == 1 || db == 1)
        << "shapes " << shape_str(a) << " and " << shape_str(b) << " do not broadcast (dim " << i << ")";
    out[i] = da == 1 ? db : da;
  }
  return out;
}

Tensor make_tensor(std::shared_ptr<Storage> storage, Shape shape, Shape strides, int64_t offset, DType dtype) {
  LOOM_CHECK(storage != nullptr) << "make_tensor: null storage";
  LOOM_CHECK(shape.size() == strides.size()) << "make_tensor: shape " << shape_str(shape) << " and strides "
                                             << shape_str(strides) << " differ in rank";
  int64_t max_index = offset;
  bool empty = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    LOOM_CHECK(shape[i] >= 0) << "negative size in shape " << shape_str(shape);
    LOOM_CHECK(strides[i] >= 0) << "negative stride in " << shape_str(strides);
    if (shape[i] == 0) empty = true;
    else max_index += (shape[i] - 1) * strides[i];
  }
  LOOM_CHECK(offset >= 0) << "negative offset " << offset;
  if (!empty) {
    LOOM_CHECK(static_cast<size_t>(max_index + 1) * dtype_size(dtype) <= storage->nbytes())
        << "view " << shape_str(shape) << " strides " << shape_str(strides) << " offset " << offset
        << " exceeds storage of " << storage->nbytes() << " bytes";
  }
  Tensor t;
  t.device_ = storage->device();
  t.storage_ = std::move(storage);
  t.shape_ = std::move(shape);
  t.strides_ = std::move(strides);
  t.offset_ = offset;
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) LOOM_CHECK(d >= 0) << "negative size in shape " << shape_str(shape);
  auto storage = std::make_shared<Storage>(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype), device);
  return make_tensor(std::move(storage), shape, contiguous_strides(shape), 0, dtype);
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}
Tensor Tensor::scalar(double value, DType dtype, Device device) { return full({}, value, dtype, device); }

Tensor Tensor::arange(int64_t n, DType dtype, Device device) {
  LOOM_CHECK(n >= 0) << "arange(" << n << ")";
  Tensor t = empty({n}, dtype, Device::cpu());
  LOOM_DISPATCH_ALL(dtype, T, [&] {
    T* p = t.data<T>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(static_cast<float>(i));
  });
  return device.is_cpu() ? t : t.to(device);
}

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, const Shape& shape) {
  LOOM_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape))
      << "from_vector: " << values.size() << " values for shape " << shape_str(shape);
  Tensor t = empty(shape, DTypeOf<T>::value);
  std::copy(values.begin(), values.end(), t.data<T>());
  return t;
}
template Tensor Tensor::from_vector(const std::vector<double>&, const Shape&);
template Tensor Tensor::from_vector(const std::vector<float>&, const Shape&);
template Tensor Tensor::from_vector(const std::vector<bf16>&, const Shape&);
template Tensor Tensor::from_vector(const std::vector<f16>&, const Shape&);
template Tensor Tensor::from_vector(const std::vector<int64_t>&, const Shape&);
template Tensor Tensor::from_vector(const std::vector<int32_t>&, const Shape&);
template Tensor Tensor::from_vector(const std::vector<uint8_t>&, const Shape&);

int64_t Tensor::size(int64_t d) const { return shape_[wrap_dim(d, dim())]; }
int64_t Tensor::stride(int64_t d) const { return strides_[wrap_dim(d, dim())]; }

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    if (shape_[i] == 1) continue;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  LOOM_CHECK(defined()) << "access to an undefined tensor";
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<int64_t>(dtype_size(dtype_));
}

// ---- element conversion helpers ----
namespace {
template <typename T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) return static_cast<double>(static_cast<float>(v));
  else return static_cast<double>(v);
}
template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) return T(static_cast<float>(v));
  else return static_cast<T>(v);
}

template <typename D, typename S>
D convert(S v) {
  if constexpr (std::is_same_v<D, S>) return v;
  else return from_double<D>(to_double(v));
}

// Walks every element of `shape` in row-major order, calling fn(src_index, dst_index).
template <typename Fn>
void for_each_index(const Shape& shape, const Shape& src_strides, int64_t src_offset, const Shape& dst_strides,
                    int64_t dst_offset, Fn&& fn) {
  int64_t n = shape_numel(shape);
  if (n == 0) return;
  int64_t nd = static_cast<int64_t>(shape.size());
  std::vector<int64_t> idx(nd, 0);
  int64_t s = src_offset, d = dst_offset;
  for (int64_t count = 0; count < n; ++count) {
    fn(s, d);
    for (int64_t k = nd - 1; k >= 0; --k) {
      if (++idx[k] < shape[k]) {
        s += src_strides[k];
        d += dst_strides[k];
        break;
      }
      s -= (shape[k] - 1) * src_strides[k];
      d -= (shape[k] - 1) * dst_strides[k];
      idx[k] = 0;
    }
  }
}

// The layout of t for the device copy kernels.
cuda_rt::StridedLayout layout_of(const Tensor& t) {
  LOOM_CHECK(t.dim() <= cuda_rt::kMaxDims) << "CUDA copy of a " << t.dim() << "-d tensor (at most "
                                           << cuda_rt::kMaxDims << " dims)";
  cuda_rt::StridedLayout l;
  l.ndim = static_cast<int>(t.dim());
  for (int d = 0; d < l.ndim; ++d) {
    l.shape[d] = t.shape()[d];
    l.strides[d] = t.strides()[d];
  }
  l.offset = t.offset();
  return l;
}

// Element-wise copy between two tensors on the same CUDA device (any layouts and dtypes).
void device_copy(const Tensor& dst, const Tensor& src) {
  Stream& s = Stream::default_for(dst.device());
  cuda_rt::strided_copy(dst.storage()->data(), static_cast<int>(dst.dtype()), layout_of(dst), src.storage()->data(),
                        static_cast<int>(src.dtype()), layout_of(src), dst.device().index, s.handle());
}

// Strided host-to-host element copy with conversion.
void host_copy(const Tensor& dst, const Tensor& src) {
  LOOM_DISPATCH_ALL(dst.dtype(), D, [&] {
    LOOM_DISPATCH_ALL(src.dtype(), S, [&] {
      D* dp = static_cast<D*>(dst.storage()->data());
      const S* sp = static_cast<const S*>(src.storage()->data());
      for_each_index(dst.shape(), src.strides(), src.offset(), dst.strides(), dst.offset(),
                     [&](int64_t si, int64_t di) {
                       dp[di] = convert<D>(sp[si]);
                     });
    });
  });
}
}  // namespace

double Tensor::item() const {
  LOOM_CHECK(numel() == 1) << "item() on a tensor of shape " << shape_str(shape_);
  Tensor host = device_.is_cpu() ? *this : to(Device::cpu());
  return LOOM_DISPATCH_ALL(host.dtype_, T, [&]() -> double { return to_double(*host.data<T>()); });
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor host = to(Device::cpu()).to(DTypeOf<T>::value).contiguous();
  const T* p = host.data<T>();
  return std::vector<T>(p, p + host.numel());
}
template std::vector<double> Tensor::to_vector() const;
template std::vector<float> Tensor::to_vector() const;
template std::vector<bf16> Tensor::to_vector() const;
template std::vector<f16> Tensor::to_vector() const;
template std::vector<int64_t> Tensor::to_vector() const;
template std::vector<int32_t> Tensor::to_vector() const;
template std::vector<uint8_t> Tensor::to_vector() const;

// ---- views ----
Tensor Tensor::view(const Shape& shape) const {
  LOOM_CHECK(is_contiguous()) << "view" << shape_str(shape) << " of a non-contiguous tensor " << shape_str(shape_)
                              << " strides " << shape_str(strides_) << "; use reshape() or contiguous()";
  Shape resolved = shape;
  int64_t infer = -1, known = 1;
  for (size_t i = 0; i < resolved.size(); ++i) {
    if (resolved[i] == -1) {
      LOOM_CHECK(infer < 0) << "view" << shape_str(shape) << ": more than one -1";
      infer = static_cast<int64_t>(i);
    } else {
      LOOM_CHECK(resolved[i] >= 0) << "view" << shape_str(shape) << ": negative size";
      known *= resolved[i];
    }
  }
  if (infer >= 0) {
    LOOM_CHECK(known > 0 && numel() % known == 0) << "view" << shape_str(shape) << " of " << numel() << " elements";
    resolved[infer] = numel() / known;
  }
  LOOM_CHECK(shape_numel(resolved) == numel()) << "view" << shape_str(shape) << " of a tensor of shape "
                                               << shape_str(shape_) << " (" << numel() << " elements)";
  return make_tensor(storage_, resolved, contiguous_strides(resolved), offset_, dtype_);
}

Tensor Tensor::reshape(const Shape& shape) const { return is_contiguous() ? view(shape) : contiguous().view(shape); }

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  d = wrap_dim(d, dim());
  int64_t n = shape_[d];
  if (start < 0) start += n;
  if (end < 0) end += n;
  end = std::min(end, n);
  LOOM_CHECK(step >= 1) << "slice step " << step << " must be >= 1";
  LOOM_CHECK(start >= 0 && start <= end) << "slice [" << start << ", " << end << ") of dim " << d << " with size "
                                         << n;
  Shape shape = shape_, strides = strides_;
  shape[d] = (end - start + step - 1) / step;
  strides[d] = strides_[d] * step;
  return make_tensor(storage_, shape, strides, offset_ + start * strides_[d], dtype_);
}

Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  d = wrap_dim(d, dim());
  LOOM_CHECK(start >= 0 && length >= 0 && start + length <= shape_[d])
      << "narrow(dim " << d << ", start " << start << ", length " << length << ") of size " << shape_[d];
  return slice(d, start, start + length);
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  d = wrap_dim(d, dim());
  LOOM_CHECK(index >= -shape_[d] && index < shape_[d]) << "select index " << index << " for size " << shape_[d];
  if (index < 0) index += shape_[d];
  Shape shape = shape_, strides = strides_;
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return make_tensor(storage_, shape, strides, offset_ + index * strides_[d], dtype_);
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  d0 = wrap_dim(d0, dim());
  d1 = wrap_dim(d1, dim());
  Shape shape = shape_, strides = strides_;
  std::swap(shape[d0], shape[d1]);
  std::swap(strides[d0], strides[d1]);
  return make_tensor(storage_, shape, strides, offset_, dtype_);
}

Tensor Tensor::permute(const std::vector<int64_t>& order) const {
  LOOM_CHECK(static_cast<int64_t>(order.size()) == dim()) << "permute of a " << dim() << "-d tensor with "
                                                           << order.size() << " dims";
  Shape shape(order.size()), strides(order.size());
  std::vector<bool> seen(order.size(), false);
  for (size_t i = 0; i < order.size(); ++i) {
    int64_t d = wrap_dim(order[i], dim());
    LOOM_CHECK(!seen[d]) << "permute: dimension " << d << " repeated";
    seen[d] = true;
    shape[i] = shape_[d];
    strides[i] = strides_[d];
  }
  return make_tensor(storage_, shape, strides, offset_, dtype_);
}

Tensor Tensor::unsqueeze(int64_t d) const {
  d = wrap_dim(d, dim() + 1);
  Shape shape = shape_, strides = strides_;
  int64_t stride = d < dim() ? strides_[d] * shape_[d] : 1;
  shape.insert(shape.begin() + d, 1);
  strides.insert(strides.begin() + d, stride);
  return make_tensor(storage_, shape, strides, offset_, dtype_);
}

Tensor Tensor::squeeze(int64_t d) const {
  d = wrap_dim(d, dim());
  LOOM_CHECK(shape_[d] == 1) << "squeeze(" << d << ") of size " << shape_[d];
  return select(d, 0);
}

Tensor Tensor::expand(const Shape& shape) const {
  LOOM_CHECK(shape.size() >= shape_.size()) << "expand " << shape_str(shape_) << " to " << shape_str(shape);
  size_t lead = shape.size() - shape_.size();
  Shape strides(shape.size(), 0);
  for (size_t i = 0; i < shape_.size(); ++i) {
    int64_t want = shape[lead + i];
    if (shape_[i] == want) strides[lead + i] = strides_[i];
    else
      LOOM_CHECK(shape_[i] == 1) << "expand " << shape_str(shape_) << " to " << shape_str(shape) << ": dim " << i
                                 << " has size " << shape_[i];
  }
  return make_tensor(storage_, shape, strides, offset_, dtype_);
}

// ---- copies ----
Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::clone() const {
  Tensor out = empty(shape_, dtype_, device_);
  out.copy_(*this);
  return out;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  Tensor out = empty(shape_, dtype, device_);
  out.copy_(*this);
  return out;
}

Tensor Tensor::to(Device device) const {
  if (device == device_) return *this;
  Tensor out = empty(shape_, dtype_, device);
  out.copy_(*this);
  return out;
}

void Tensor::copy_(const Tensor& src) {
  LOOM_CHECK(defined() && src.defined()) << "copy_ with an undefined tensor";
  check_same_shape(*this, src, "copy_");
  if (numel() == 0) return;
  bool same_layout = is_contiguous() && src.is_contiguous() && dtype_ == src.dtype_;
  if (same_layout) {
    copy_bytes(raw_data(), device_, src.raw_data(), src.device_, nbytes());
    return;
  }
  if (device_.is_cpu() && src.device_.is_cpu()) {
    host_copy(*this, src);
    return;
  }
  if (device_ == src.device_) {  // one CUDA device: one kernel
    device_copy(*this, src);
    return;
  }
  if (device_.is_cpu()) {
    // Device -> host: compact (and keep the dtype) on the device, move the bytes, convert on the host.
    Tensor packed = src.contiguous();
    Tensor staged = empty(shape_, src.dtype_, Device::cpu());
    copy_bytes(staged.raw_data(), Device::cpu(), packed.raw_data(), packed.device_, packed.nbytes());
    host_copy(*this, staged);
    return;
  }
  // Host -> device, or between two devices: bring src over in its own dtype as
  // contiguous bytes, then relayout/convert on the destination device.
  Tensor packed = src.device_.is_cpu() ? src.contiguous() : src.contiguous().to(Device::cpu());
  Tensor staged = empty(shape_, src.dtype_, device_);
  copy_bytes(staged.raw_data(), device_, packed.raw_data(), Device::cpu(), packed.nbytes());
  device_copy(*this, staged);
}

void Tensor::fill_(double value) {
  LOOM_CHECK(defined()) << "fill_ on an undefined tensor";
  if (device_.is_cpu()) {
    LOOM_DISPATCH_ALL(dtype_, T, [&] {
      T v = from_double<T>(value);
      T* base = static_cast<T*>(storage_->data());
      for_each_index(shape_, strides_, offset_, strides_, offset_, [&](int64_t, int64_t i) { base[i] = v; });
    });
    return;
  }
  Stream& s = Stream::default_for(device_);
  if (value == 0.0 && !std::signbit(value) && is_contiguous()) {
    cuda_rt::memset_async(raw_data(), 0, nbytes(), device_.index, s.handle());  // all-zero bits are 0 in every dtype
    return;
  }
  cuda_rt::strided_fill(storage_->data(), static_cast<int>(dtype_), layout_of(*this), value, device_.index,
                        s.handle());
}

std::string Tensor::str(int64_t max_per_dim) const {
  std::ostringstream os;
  os << "Tensor" << shape_str(shape_) << " " << dtype_ << " " << device_;
  if (!defined()) return "Tensor(undefined)";
  Tensor host = to(Device::cpu());
  std::vector<double> values = host.to_vector<double>();
  Shape strides = contiguous_strides(shape_);
  // Recursive nested-bracket printing, eliding the middle of long dimensions.
  std::function<void(int64_t, int64_t)> print = [&](int64_t d, int64_t base) {
    if (d == dim()) {
      os << fmt::format("{:.6g}", values[base]);
      return;
    }
    os << "[";
    int64_t n = shape_[d];
    for (int64_t i = 0; i < n; ++i) {
      if (n > max_per_dim && i == max_per_dim / 2) {
        os << "..., ";
        i = n - max_per_dim / 2 - 1;
        continue;
      }
      print(d + 1, base + i * strides[d]);
      if (i + 1 < n) os << ", ";
    }
    os << "]";
  };
  os << "\n";
  print(0, 0);
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.str(); }

}  // namespace loom
