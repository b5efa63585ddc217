// Token files on disk: the read-only memory mapping, atomic writes, llm.c shards and
// Megatron indexed datasets. Structure is validated when a file is opened; token ids are
// checked against the vocabulary while they are copied out (see data.h for why).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <type_traits>

#include "framework/data.h"
#include "framework/error.h"

static_assert(std::endian::native == std::endian::little, "token files are little-endian; so must the host be");

namespace loom {
namespace {

template <typename T>
T load(const uint8_t* p) {  // unaligned little-endian load
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

template <typename T>
void append(std::vector<uint8_t>& bytes, T value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  bytes.insert(bytes.end(), p, p + sizeof(T));
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Copies count tokens of type Src to Out, checking each lies in [0, limit). `first` is the
// file position of src[0], for the message.
template <typename Src, typename Out>
void convert_tokens(Out* out, const Src* src, int64_t count, int64_t vocab_size, const std::string& path,
                    int64_t first, int64_t file_tokens) {
  constexpr int64_t out_limit = static_cast<int64_t>(std::numeric_limits<Out>::max());
  const int64_t limit = vocab_size > 0 ? std::min(vocab_size, out_limit) : out_limit;
  bool ok = true;
  for (int64_t i = 0; i < count; ++i) {
    const Src v = src[i];
    if constexpr (std::is_signed_v<Src>) ok &= v >= 0;
    ok &= static_cast<int64_t>(v) < limit;
    out[i] = static_cast<Out>(v);
  }
  if (ok) return;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t v = static_cast<int64_t>(src[i]);
    LOOM_CHECK(v >= 0 && v < limit) << path << ": token " << v << " at position " << first + i << " (of "
                                    << file_tokens << ") is outside "
                                    << (vocab_size > 0 ? "the vocabulary" : "the range of the output type") << " [0, "
                                    << limit << ")";
  }
}

void check_range(const std::string& path, int64_t begin, int64_t end, int64_t num_tokens) {
  LOOM_CHECK(0 <= begin && begin <= end && end <= num_tokens)
      << path << ": read of tokens [" << begin << ", " << end << ") outside [0, " << num_tokens << ")";
}

constexpr char kIndexMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr size_t kIndexHeaderBytes = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype, S, D

// Calls fn(Src*) with the token pointer typed by an integer dtype code.
template <typename Fn>
void dispatch_indexed(IndexedDType dtype, const uint8_t* p, Fn&& fn) {
  switch (dtype) {
    case IndexedDType::u8: return fn(reinterpret_cast<const uint8_t*>(p));
    case IndexedDType::i8: return fn(reinterpret_cast<const int8_t*>(p));
    case IndexedDType::i16: return fn(reinterpret_cast<const int16_t*>(p));
    case IndexedDType::i32: return fn(reinterpret_cast<const int32_t*>(p));
    case IndexedDType::i64: return fn(reinterpret_cast<const int64_t*>(p));
    case IndexedDType::u16: return fn(reinterpret_cast<const uint16_t*>(p));
    default: LOOM_FAIL() << "indexed dataset dtype " << indexed_dtype_name(dtype) << " is not an integer token type";
  }
}

}  // namespace

// ---------------------------------------------------------------- MappedFile

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK(fd >= 0) << "cannot open " << path << ": " << std::strerror(errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    int err = errno;
    ::close(fd);
    LOOM_FAIL() << "cannot map " << path << ": " << (S_ISREG(st.st_mode) ? std::strerror(err) : "not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    ::close(fd);
    LOOM_CHECK(p != MAP_FAILED) << "cannot mmap " << path << " (" << size_ << " bytes): " << std::strerror(err);
    data_ = static_cast<const uint8_t*>(p);
  } else {
    ::close(fd);
  }
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)), data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
    path_ = std::move(other.path_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void TokenFile::check_all_tokens() const {
  constexpr int64_t chunk = 1 << 20;
  std::vector<int32_t> buffer(static_cast<size_t>(std::min<int64_t>(chunk, num_tokens())));
  for (int64_t begin = 0; begin < num_tokens(); begin += chunk) read(buffer.data(), begin, std::min(num_tokens(), begin + chunk));
}

// ---------------------------------------------------------------- llm.c shards

void write_token_shard(const std::string& path, std::span<const int32_t> tokens) {
  std::vector<uint8_t> bytes(static_cast<size_t>(kShardHeaderBytes) + 2 * tokens.size(), 0);
  int32_t header[3] = {kShardMagic, kShardVersion, static_cast<int32_t>(tokens.size())};
  LOOM_CHECK(tokens.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()))
      << path << ": " << tokens.size() << " tokens do not fit an llm.c shard (at most 2^31 - 1)";
  std::memcpy(bytes.data(), header, sizeof(header));
  uint8_t* out = bytes.data() + kShardHeaderBytes;
  for (size_t i = 0; i < tokens.size(); ++i) {
    LOOM_CHECK(tokens[i] >= 0 && tokens[i] <= 65535)
        << path << ": token " << tokens[i] << " at position " << i << " does not fit uint16 [0, 65535]";
    uint16_t v = static_cast<uint16_t>(tokens[i]);
    std::memcpy(out + 2 * i, &v, 2);
  }
  write_file_atomic(path, bytes.data(), bytes.size());
}

TokenShard::TokenShard(const std::string& path, int64_t vocab_size) : file_(path), vocab_size_(vocab_size) {
  const int64_t size = static_cast<int64_t>(file_.size());
  LOOM_CHECK(size >= kShardHeaderBytes) << path << ": file is " << size << " bytes, shorter than the llm.c header ("
                                        << kShardHeaderBytes << " bytes)";
  const int32_t magic = load<int32_t>(file_.data());
  const int32_t version = load<int32_t>(file_.data() + 4);
  const int32_t count = load<int32_t>(file_.data() + 8);
  LOOM_CHECK(magic == kShardMagic) << path << ": not an llm.c token shard: magic " << magic << ", expected "
                                   << kShardMagic;
  LOOM_CHECK(version == kShardVersion) << path << ": unsupported llm.c shard version " << version << " (supported: "
                                       << kShardVersion << ", uint16 tokens)";
  LOOM_CHECK(count >= 0) << path << ": negative token count " << count << " in the header";
  const int64_t payload = size - kShardHeaderBytes;
  LOOM_CHECK(payload == 2 * static_cast<int64_t>(count))
      << path << ": header says " << count << " tokens (" << 2 * static_cast<int64_t>(count) << " bytes after the "
      << kShardHeaderBytes << "-byte header) but the file has " << payload << " bytes after it ("
      << (payload < 2 * static_cast<int64_t>(count) ? "truncated" : "trailing bytes") << ")";
  num_tokens_ = count;
}

template <typename Out>
void TokenShard::read_impl(Out* out, int64_t begin, int64_t end) const {
  check_range(path(), begin, end, num_tokens_);
  const auto* tokens = reinterpret_cast<const uint16_t*>(file_.data() + kShardHeaderBytes);
  convert_tokens(out, tokens + begin, end - begin, vocab_size_, path(), begin, num_tokens_);
}
void TokenShard::read(int64_t* out, int64_t begin, int64_t end) const { read_impl(out, begin, end); }
void TokenShard::read(int32_t* out, int64_t begin, int64_t end) const { read_impl(out, begin, end); }

// ---------------------------------------------------------------- Megatron indexed datasets

const char* indexed_dtype_name(IndexedDType dtype) {
  switch (dtype) {
    case IndexedDType::u8: return "uint8 (code 1)";
    case IndexedDType::i8: return "int8 (code 2)";
    case IndexedDType::i16: return "int16 (code 3)";
    case IndexedDType::i32: return "int32 (code 4)";
    case IndexedDType::i64: return "int64 (code 5)";
    case IndexedDType::f64: return "float64 (code 6)";
    case IndexedDType::f32: return "float32 (code 7)";
    case IndexedDType::u16: return "uint16 (code 8)";
  }
  return "unknown";
}

size_t indexed_dtype_size(IndexedDType dtype) {
  switch (dtype) {
    case IndexedDType::u8: case IndexedDType::i8: return 1;
    case IndexedDType::i16: case IndexedDType::u16: return 2;
    case IndexedDType::i32: case IndexedDType::f32: return 4;
    case IndexedDType::i64: case IndexedDType::f64: return 8;
  }
  LOOM_FAIL() << "unknown indexed dataset dtype code " << static_cast<int>(dtype) << " (known: 1-8)";
}

void write_indexed_dataset(const std::string& prefix, const std::vector<std::vector<int64_t>>& sequences,
                           IndexedDType dtype, std::vector<int64_t> document_indices) {
  (void)indexed_dtype_size(dtype);  // throws on an unknown code
  LOOM_CHECK(dtype != IndexedDType::f32 && dtype != IndexedDType::f64)
      << prefix << ": token dtype must be an integer type, got " << indexed_dtype_name(dtype);
  if (document_indices.empty()) {
    for (size_t i = 0; i <= sequences.size(); ++i) document_indices.push_back(static_cast<int64_t>(i));
  }
  std::vector<uint8_t> bin;
  std::vector<int64_t> pointers;
  for (size_t s = 0; s < sequences.size(); ++s) {
    pointers.push_back(static_cast<int64_t>(bin.size()));
    for (int64_t v : sequences[s]) {
      int64_t lo = 0, hi = 0;
      switch (dtype) {
        case IndexedDType::u8: hi = 255; append(bin, static_cast<uint8_t>(v)); break;
        case IndexedDType::i8: lo = -128; hi = 127; append(bin, static_cast<int8_t>(v)); break;
        case IndexedDType::i16: lo = -32768; hi = 32767; append(bin, static_cast<int16_t>(v)); break;
        case IndexedDType::u16: hi = 65535; append(bin, static_cast<uint16_t>(v)); break;
        case IndexedDType::i32: lo = INT32_MIN; hi = INT32_MAX; append(bin, static_cast<int32_t>(v)); break;
        default: lo = INT64_MIN; hi = INT64_MAX; append(bin, v); break;
      }
      LOOM_CHECK(lo <= v && v <= hi) << prefix << ": token " << v << " in sequence " << s << " does not fit "
                                     << indexed_dtype_name(dtype);
    }
  }
  std::vector<uint8_t> idx(kIndexMagic, kIndexMagic + 9);
  append<uint64_t>(idx, 1);
  append<uint8_t>(idx, static_cast<uint8_t>(dtype));
  append<uint64_t>(idx, sequences.size());
  append<uint64_t>(idx, document_indices.size());
  for (const auto& seq : sequences) append<int32_t>(idx, static_cast<int32_t>(seq.size()));
  for (int64_t p : pointers) append<int64_t>(idx, p);
  for (int64_t d : document_indices) append<int64_t>(idx, d);
  write_file_atomic(prefix + ".bin", bin.data(), bin.size());
  write_file_atomic(prefix + ".idx", idx.data(), idx.size());
}

IndexedDataset::IndexedDataset(const std::string& prefix, int64_t vocab_size)
    : prefix_(prefix), idx_(prefix + ".idx"), bin_(prefix + ".bin"), vocab_size_(vocab_size) {
  const std::string& ip = idx_.path();
  const uint8_t* p = idx_.data();
  const size_t size = idx_.size();
  LOOM_CHECK(size >= kIndexHeaderBytes) << ip << ": file is " << size << " bytes, shorter than the index header ("
                                        << kIndexHeaderBytes << " bytes)";
  LOOM_CHECK(std::memcmp(p, kIndexMagic, 9) == 0) << ip << ": not a Megatron index: magic is not \"MMIDIDX\\0\\0\"";
  const uint64_t version = load<uint64_t>(p + 9);
  LOOM_CHECK(version == 1) << ip << ": unsupported index version " << version << " (supported: 1)";
  const uint8_t code = p[17];
  LOOM_CHECK(code >= 1 && code <= 8) << ip << ": unknown dtype code " << static_cast<int>(code) << " (known: 1-8)";
  dtype_ = static_cast<IndexedDType>(code);
  LOOM_CHECK(dtype_ != IndexedDType::f32 && dtype_ != IndexedDType::f64)
      << ip << ": dtype " << indexed_dtype_name(dtype_) << " is not an integer token type";
  const uint64_t s = load<uint64_t>(p + 18);
  const uint64_t d = load<uint64_t>(p + 26);
  constexpr uint64_t kMaxCount = uint64_t{1} << 40;  // keeps the size arithmetic below exact
  LOOM_CHECK(s < kMaxCount && d < kMaxCount) << ip << ": implausible counts (" << s << " sequences, " << d
                                             << " document indices); file is " << size << " bytes";
  LOOM_CHECK(d >= 1) << ip << ": document index count is 0 (at least the final sentinel is expected)";
  num_sequences_ = static_cast<int64_t>(s);
  sizes_offset_ = kIndexHeaderBytes;
  pointers_offset_ = sizes_offset_ + 4 * s;
  const size_t docs_offset = pointers_offset_ + 8 * s;
  const size_t expected = docs_offset + 8 * d;
  LOOM_CHECK(size == expected || size == expected + s)
      << ip << ": index of " << s << " sequences and " << d << " document indices needs " << expected
      << " bytes (or " << expected + s << " with sequence modes), file has " << size << " ("
      << (size < expected ? "truncated" : "trailing bytes") << ")";

  const size_t item = indexed_dtype_size(dtype_);
  int64_t offset = 0;  // running byte offset in .bin
  for (int64_t i = 0; i < num_sequences_; ++i) {
    const int32_t n = load<int32_t>(p + sizes_offset_ + 4 * i);
    const int64_t ptr = load<int64_t>(p + pointers_offset_ + 8 * i);
    LOOM_CHECK(n >= 0) << ip << ": sequence " << i << " has negative size " << n;
    LOOM_CHECK(ptr == offset) << ip << ": sequence " << i << " starts at byte " << ptr << " of the .bin, expected "
                              << offset << " (sequences must be stored back to back)";
    offset += static_cast<int64_t>(n) * static_cast<int64_t>(item);
  }
  document_indices_.resize(d);
  for (uint64_t k = 0; k < d; ++k) {
    document_indices_[k] = load<int64_t>(p + docs_offset + 8 * k);
    const int64_t prev = k == 0 ? 0 : document_indices_[k - 1];
    LOOM_CHECK(document_indices_[k] >= prev && document_indices_[k] <= num_sequences_)
        << ip << ": document index " << k << " is " << document_indices_[k] << ", expected within [" << prev << ", "
        << num_sequences_ << "]";
  }
  LOOM_CHECK(document_indices_.front() == 0 && document_indices_.back() == num_sequences_)
      << ip << ": document indices run from " << document_indices_.front() << " to " << document_indices_.back()
      << ", expected 0 to " << num_sequences_;
  LOOM_CHECK(static_cast<int64_t>(bin_.size()) == offset)
      << bin_.path() << ": the index " << ip << " describes " << offset << " bytes (" << offset / static_cast<int64_t>(item)
      << " " << indexed_dtype_name(dtype_) << " tokens), file has " << bin_.size() << " ("
      << (static_cast<int64_t>(bin_.size()) < offset ? "truncated" : "trailing bytes") << ")";
  num_tokens_ = offset / static_cast<int64_t>(item);
}

int64_t IndexedDataset::sequence_length(int64_t i) const {
  LOOM_CHECK(0 <= i && i < num_sequences_) << prefix_ << ": sequence " << i << " outside [0, " << num_sequences_ << ")";
  return load<int32_t>(idx_.data() + sizes_offset_ + 4 * i);
}

int64_t IndexedDataset::sequence_start(int64_t i) const {
  LOOM_CHECK(0 <= i && i < num_sequences_) << prefix_ << ": sequence " << i << " outside [0, " << num_sequences_ << ")";
  return load<int64_t>(idx_.data() + pointers_offset_ + 8 * i) / static_cast<int64_t>(indexed_dtype_size(dtype_));
}

template <typename Out>
void IndexedDataset::read_impl(Out* out, int64_t begin, int64_t end) const {
  check_range(path(), begin, end, num_tokens_);
  if (begin == end) return;
  dispatch_indexed(dtype_, bin_.data(), [&](const auto* tokens) {
    convert_tokens(out, tokens + begin, end - begin, vocab_size_, path(), begin, num_tokens_);
  });
}
void IndexedDataset::read(int64_t* out, int64_t begin, int64_t end) const { read_impl(out, begin, end); }
void IndexedDataset::read(int32_t* out, int64_t begin, int64_t end) const { read_impl(out, begin, end); }

std::unique_ptr<TokenFile> open_token_file(const std::string& entry, int64_t vocab_size) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (ends_with(entry, ".idx")) return std::make_unique<IndexedDataset>(entry.substr(0, entry.size() - 4), vocab_size);
  if (fs::exists(entry + ".idx", ec)) return std::make_unique<IndexedDataset>(entry, vocab_size);
  if (ends_with(entry, ".bin")) {
    std::string stem = entry.substr(0, entry.size() - 4);
    if (fs::exists(stem + ".idx", ec)) return std::make_unique<IndexedDataset>(stem, vocab_size);
  }
  return std::make_unique<TokenShard>(entry, vocab_size);
}

}  // namespace loom
