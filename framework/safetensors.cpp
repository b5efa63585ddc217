// safetensors writer and validating reader (format in safetensors.h). The
// writer streams one tensor at a time into a temp file so exporting a large
// model needs no second copy of it in memory; the reader trusts nothing in the
// header until it has checked it against the file size.
#include "framework/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "framework/checkpoint_io.h"

namespace loom {

namespace fs = std::filesystem;
static_assert(std::endian::native == std::endian::little, "safetensors IO assumes a little-endian host");

namespace {

// The largest header accepted (the reference implementation's limit too).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

const DType kSupported[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8};

// A file written under path + ".tmp" and renamed over `path` by commit();
// destroyed uncommitted, it removes the temp file.
class AtomicFile {
 public:
  explicit AtomicFile(const fs::path& path) : path_(path), tmp_(path) {
    tmp_ += ".tmp";
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    LOOM_CHECK(fd_ >= 0) << "cannot create '" << tmp_.string() << "': " << std::strerror(errno);
  }
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) {
      std::error_code ec;
      fs::remove(tmp_, ec);
    }
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t nbytes) {
    const char* p = static_cast<const char*>(data);
    while (nbytes > 0) {
      ssize_t n = ::write(fd_, p, nbytes);
      if (n < 0 && errno == EINTR) continue;
      LOOM_CHECK(n > 0) << "writing " << nbytes << " bytes to '" << tmp_.string() << "' failed: " << std::strerror(errno);
      p += n;
      nbytes -= static_cast<size_t>(n);
    }
  }
  void commit() {
    LOOM_CHECK(::fsync(fd_) == 0) << "fsync of '" << tmp_.string() << "' failed: " << std::strerror(errno);
    int status = ::close(fd_);
    fd_ = -1;
    LOOM_CHECK(status == 0) << "closing '" << tmp_.string() << "' failed: " << std::strerror(errno);
    std::error_code ec;
    fs::rename(tmp_, path_, ec);
    LOOM_CHECK(!ec) << "renaming '" << tmp_.string() << "' to '" << path_.string() << "' failed: " << ec.message();
    committed_ = true;
    fsync_path(path_.parent_path().empty() ? fs::path(".") : path_.parent_path());
  }

 private:
  fs::path path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

// Reads a non-negative JSON integer, failing with `what` otherwise.
uint64_t json_uint(const nlohmann::ordered_json& value, const std::string& path, const std::string& what) {
  LOOM_CHECK(value.is_number_unsigned() || (value.is_number_integer() && value.get<int64_t>() >= 0))
      << "safetensors file '" << path << "': " << what << " is " << value.dump() << ", not a non-negative integer";
  return value.get<uint64_t>();
}

struct HeaderEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

}  // namespace

const char* safetensors_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f64: return "F64";
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i64: return "I64";
    case DType::i32: return "I32";
    case DType::u8: return "U8";
  }
  LOOM_FAIL() << "unknown dtype " << static_cast<int>(dtype);
}

DType dtype_from_safetensors_name(const std::string& name) {
  for (DType d : kSupported)
    if (name == safetensors_dtype_name(d)) return d;
  LOOM_FAIL() << "safetensors dtype '" << name << "' is not supported by loom (F64, F32, BF16, F16, I64, I32, U8)";
}

void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata, std::optional<DType> float_dtype) {
  LOOM_CHECK(!float_dtype || is_floating(*float_dtype))
      << "safetensors file '" << path << "': float_dtype " << *float_dtype << " is not a floating dtype";
  auto out_dtype = [&](const Tensor& t) { return float_dtype && is_floating(t.dtype()) ? *float_dtype : t.dtype(); };

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    LOOM_CHECK(!name.empty() && name != "__metadata__")
        << "safetensors file '" << path << "': tensor name '" << name << "' is empty or reserved";
    LOOM_CHECK(seen.insert(name).second) << "safetensors file '" << path << "': tensor '" << name << "' appears twice";
    LOOM_CHECK(tensor.defined()) << "safetensors file '" << path << "': tensor '" << name << "' is undefined";
    uint64_t nbytes = static_cast<uint64_t>(tensor.numel()) * dtype_size(out_dtype(tensor));
    header[name] = {{"dtype", safetensors_dtype_name(out_dtype(tensor))},
                    {"shape", tensor.shape()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. a name that is not UTF-8
    LOOM_FAIL() << "safetensors file '" << path << "': cannot encode the header: " << e.what();
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the reference writer pads to 8 bytes too
  uint64_t header_length = text.size();

  AtomicFile file(path);
  file.write(&header_length, 8);  // little-endian host (static_assert above)
  file.write(text.data(), text.size());
  for (const auto& [name, tensor] : tensors) {
    Tensor host = tensor.to(Device::cpu()).to(out_dtype(tensor)).contiguous();
    if (host.numel() > 0) file.write(host.raw_data(), host.nbytes());
  }
  file.commit();
}

SafetensorsFile read_safetensors(const std::string& path) {
  std::error_code ec;
  uint64_t file_size = fs::file_size(path, ec);
  LOOM_CHECK(!ec) << "safetensors file '" << path << "' cannot be read: " << ec.message();
  LOOM_CHECK(file_size >= 8) << "safetensors file '" << path << "' has " << file_size
                             << " bytes, fewer than the 8-byte header length";
  std::ifstream in(path, std::ios::binary);
  LOOM_CHECK(in.good()) << "safetensors file '" << path << "' cannot be opened: " << std::strerror(errno);
  uint64_t header_length = 0;
  in.read(reinterpret_cast<char*>(&header_length), 8);
  LOOM_CHECK(header_length <= file_size - 8)
      << "safetensors file '" << path << "': header length " << header_length << " exceeds the " << file_size - 8
      << " bytes after the length field (truncated or not safetensors)";
  LOOM_CHECK(header_length <= kMaxHeaderBytes)
      << "safetensors file '" << path << "': header length " << header_length << " is over the " << kMaxHeaderBytes
      << "-byte limit";
  std::string text(header_length, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_length));
  LOOM_CHECK(in.good()) << "safetensors file '" << path << "': reading the " << header_length << "-byte header failed";
  const uint64_t data_start = 8 + header_length;
  const uint64_t data_size = file_size - data_start;

  nlohmann::ordered_json header;
  try {
    header = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL() << "safetensors file '" << path << "': the header is not valid JSON: " << e.what();
  }
  LOOM_CHECK(header.is_object()) << "safetensors file '" << path << "': the header is not a JSON object";

  SafetensorsFile result;
  std::vector<HeaderEntry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      LOOM_CHECK(value.is_object()) << "safetensors file '" << path << "': __metadata__ is not an object";
      for (const auto& [key, item] : value.items()) {
        LOOM_CHECK(item.is_string()) << "safetensors file '" << path << "': __metadata__ entry '" << key
                                     << "' is " << item.dump() << ", not a string";
        result.metadata[key] = item.get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    LOOM_CHECK(value.is_object() && value.contains("dtype") && value.contains("shape") && value.contains("data_offsets"))
        << "safetensors file '" << path << "': " << where << " needs an object with dtype, shape and data_offsets";
    HeaderEntry entry{name, DType::f32, {}, 0, 0};
    LOOM_CHECK(value["dtype"].is_string()) << "safetensors file '" << path << "': " << where << " has a non-string dtype";
    try {
      entry.dtype = dtype_from_safetensors_name(value["dtype"].get<std::string>());
    } catch (const Error& e) {
      LOOM_FAIL() << "safetensors file '" << path << "': " << where << ": " << e.what();
    }
    LOOM_CHECK(value["shape"].is_array()) << "safetensors file '" << path << "': " << where << " has a non-array shape";
    // numel, checked against the data size so that no product can overflow.
    uint64_t numel = 1;
    bool too_big = false;
    for (const auto& dim : value["shape"]) {
      uint64_t d = json_uint(dim, path, where + " shape entry");
      LOOM_CHECK(d <= static_cast<uint64_t>(INT64_MAX)) << "safetensors file '" << path << "': " << where
                                                         << " has dimension " << d;
      entry.shape.push_back(static_cast<int64_t>(d));
      if (d == 0) numel = 0;
      else if (numel != 0 && numel > data_size / d) too_big = true;
      else numel *= d;
    }
    if (numel == 0) too_big = false;
    const auto& offsets = value["data_offsets"];
    LOOM_CHECK(offsets.is_array() && offsets.size() == 2)
        << "safetensors file '" << path << "': " << where << " data_offsets is " << offsets.dump()
        << ", not [begin, end]";
    entry.begin = json_uint(offsets[0], path, where + " data_offsets[0]");
    entry.end = json_uint(offsets[1], path, where + " data_offsets[1]");
    LOOM_CHECK(entry.begin <= entry.end && entry.end <= data_size)
        << "safetensors file '" << path << "': " << where << " data_offsets [" << entry.begin << ", " << entry.end
        << "] are not within the " << data_size << "-byte data section";
    LOOM_CHECK(!too_big && numel * dtype_size(entry.dtype) == entry.end - entry.begin)
        << "safetensors file '" << path << "': " << where << " has shape " << shape_str(entry.shape) << " "
        << value["dtype"].get<std::string>() << " but data_offsets span " << entry.end - entry.begin << " bytes";
    entries.push_back(std::move(entry));
  }

  // The tensors must tile the data section: sorted by offset, each begins where the last ended.
  std::stable_sort(entries.begin(), entries.end(), [](const HeaderEntry& a, const HeaderEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const HeaderEntry& e = entries[i];
    LOOM_CHECK(e.begin >= covered) << "safetensors file '" << path << "': tensor '" << e.name << "' [" << e.begin << ", "
                                   << e.end << ") overlaps tensor '" << entries[i - 1].name << "' (which ends at "
                                   << covered << ")";
    LOOM_CHECK(e.begin == covered) << "safetensors file '" << path << "': bytes [" << covered << ", " << e.begin
                                   << ") before tensor '" << e.name << "' belong to no tensor";
    covered = e.end;
  }
  LOOM_CHECK(covered == data_size) << "safetensors file '" << path << "': the last " << data_size - covered
                                   << " bytes of the data section belong to no tensor";

  for (const HeaderEntry& e : entries) {
    Tensor tensor = Tensor::empty(e.shape, e.dtype);
    if (e.end > e.begin) {
      in.seekg(static_cast<std::streamoff>(data_start + e.begin));
      in.read(static_cast<char*>(tensor.raw_data()), static_cast<std::streamsize>(e.end - e.begin));
      LOOM_CHECK(in.good()) << "safetensors file '" << path << "': reading tensor '" << e.name << "' failed";
    }
    result.tensors.emplace_back(e.name, tensor);
  }
  return result;
}

}  // namespace loom
