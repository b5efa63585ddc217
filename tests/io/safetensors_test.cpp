// safetensors: round trips (dtypes kept, floats converted to bf16 with round
// to nearest even), an independent minimal parse of the written bytes (header
// length, 8-byte padding, JSON, every tensor's bytes), and hand-made corrupt
// files that the reader must reject naming the file and the tensor.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "framework/safetensors.h"
#include "tests/testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
std::string raw_bytes(const Tensor& t) {
  Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.raw_data()), c.nbytes());
}

template <typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    for (const auto& needle : needles)
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "'" << needle << "' not in: " << e.what();
  }
}

// bf16 bits of a finite float by round to nearest even, written out here
// rather than taken from framework/dtype.cpp so the check is independent.
uint16_t reference_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7fffu + lsb) >> 16);
}

// Values that exercise rounding: exact halfway cases (ties to even both ways) and ordinary ones.
Tensor rounding_probe() {
  std::vector<float> values;
  for (uint32_t bits : {0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x3f808001u, 0xbf808000u, 0x7f7fffffu, 0x00000001u})
    values.push_back(std::bit_cast<float>(bits));
  std::vector<double> random = testing::random_tensor({13}, 11).to_vector<double>();
  for (double v : random) values.push_back(static_cast<float>(v));
  return Tensor::from_vector(values, {4, 5});
}

NamedTensors export_like_tensors() {
  return {{"embed.weight", testing::random_tensor({5, 3}, 1).to(DType::f32)},
          {"blocks.0.norm.weight", rounding_probe()},
          {"blocks.0.mlp.w", testing::random_tensor({3, 2}, 2)},  // f64
          {"positions", Tensor::from_vector(std::vector<int64_t>{-1, 0, 5, 1LL << 40}, {2, 2})},
          {"ids", Tensor::from_vector(std::vector<int32_t>{7, -8, 9}, {3})},
          {"mask", Tensor::from_vector(std::vector<uint8_t>{1, 0, 1, 1, 0}, {5})},  // odd length: unaligned after it
          {"scale", Tensor::scalar(0.125, DType::f32)},
          {"empty", Tensor::empty({0, 4}, DType::f32)},
          {"half", Tensor::from_vector(std::vector<f16>{f16(1.5f), f16(-2.0f)}, {2})}};
}

// The bytes a tensor must have in the file when floats go to `float_dtype`.
std::string expected_bytes(const Tensor& t, std::optional<DType> float_dtype) {
  if (!float_dtype || !is_floating(t.dtype()) || t.dtype() == *float_dtype) return raw_bytes(t);
  EXPECT_EQ(*float_dtype, DType::bf16);
  std::string out;
  for (double v : t.to_vector<double>()) {
    uint16_t bits = reference_bf16_bits(static_cast<float>(v));  // f64 goes through f32
    out.append(reinterpret_cast<const char*>(&bits), 2);
  }
  return out;
}

TEST(Safetensors, RoundTripKeepsDtypesAndOrder) {
  TempDir dir;
  std::string path = (dir.path() / "model.safetensors").string();
  NamedTensors tensors = export_like_tensors();
  std::map<std::string, std::string> metadata = {{"format", "pt"}, {"loom_config", "{\"width\": 3}"}};
  write_safetensors(path, tensors, metadata);
  SafetensorsFile back = read_safetensors(path);
  EXPECT_EQ(back.metadata, metadata);
  ASSERT_EQ(back.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(back.tensors[i].first, tensors[i].first);
    EXPECT_EQ(back.tensors[i].second.dtype(), tensors[i].second.dtype()) << tensors[i].first;
    EXPECT_EQ(back.tensors[i].second.shape(), tensors[i].second.shape()) << tensors[i].first;
    EXPECT_TRUE(raw_bytes(back.tensors[i].second) == raw_bytes(tensors[i].second)) << tensors[i].first;
  }
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(Safetensors, Bf16ExportRoundsToNearestEven) {
  TempDir dir;
  std::string path = (dir.path() / "model.safetensors").string();
  NamedTensors tensors = export_like_tensors();
  write_safetensors(path, tensors, {}, DType::bf16);
  SafetensorsFile back = read_safetensors(path);
  EXPECT_TRUE(back.metadata.empty());
  ASSERT_EQ(back.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& in = tensors[i].second;
    const Tensor& out = back.tensors[i].second;
    EXPECT_EQ(out.dtype(), is_floating(in.dtype()) ? DType::bf16 : in.dtype()) << tensors[i].first;
    EXPECT_TRUE(raw_bytes(out) == expected_bytes(in, DType::bf16)) << tensors[i].first;
  }
  // The halfway cases went to even: 1 + 2^-8 -> 1.0, 1 + 3*2^-8 -> 1 + 2^-6.
  std::vector<bf16> probe = back.tensors[1].second.to_vector<bf16>();
  EXPECT_EQ(probe[0].bits, 0x3f80);
  EXPECT_EQ(probe[1].bits, 0x3f82);
  EXPECT_EQ(probe[2].bits, 0x3f80);
  EXPECT_EQ(probe[3].bits, 0x3f81);
  EXPECT_EQ(probe[4].bits, 0xbf80);
}

// The independent minimal reader: bytes and JSON only, no loom code.
TEST(Safetensors, IndependentParseOfTheWrittenBytes) {
  TempDir dir;
  fs::path path = dir.path() / "model.safetensors";
  NamedTensors tensors = export_like_tensors();
  // Non-contiguous input is written by value.
  Tensor base = testing::random_tensor({3, 4}, 9).to(DType::f32);
  tensors.emplace_back("transposed", base.transpose(0, 1));
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
  for (std::optional<DType> float_dtype : {std::optional<DType>(DType::bf16), std::optional<DType>()}) {
    write_safetensors(path.string(), tensors, metadata, float_dtype);
    std::string file = read_file(path);
    ASSERT_GE(file.size(), 8u);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(file[i]);  // little-endian u64
    ASSERT_LE(8 + n, file.size());
    EXPECT_EQ(n % 8, 0u) << "header not padded to 8 bytes";
    std::string header_text = file.substr(8, n);
    EXPECT_EQ(header_text.front(), '{');
    size_t last = header_text.find_last_not_of(' ');
    EXPECT_EQ(header_text[last], '}') << "padding must be spaces";
    nlohmann::json header = nlohmann::json::parse(header_text);
    EXPECT_EQ(header["__metadata__"], nlohmann::json(metadata));
    EXPECT_EQ(header.size(), tensors.size() + 1);
    std::string data = file.substr(8 + n);
    uint64_t expected_begin = 0;
    const std::map<DType, std::string> names = {{DType::f64, "F64"}, {DType::f32, "F32"}, {DType::bf16, "BF16"},
                                                {DType::f16, "F16"}, {DType::i64, "I64"}, {DType::i32, "I32"},
                                                {DType::u8, "U8"}};
    for (const auto& [name, tensor] : tensors) {
      ASSERT_TRUE(header.contains(name)) << name;
      const nlohmann::json& entry = header[name];
      DType stored = float_dtype && is_floating(tensor.dtype()) ? *float_dtype : tensor.dtype();
      EXPECT_EQ(entry["dtype"], names.at(stored)) << name;
      EXPECT_EQ(entry["shape"].get<std::vector<int64_t>>(), tensor.shape()) << name;
      uint64_t begin = entry["data_offsets"][0], end = entry["data_offsets"][1];
      EXPECT_EQ(begin, expected_begin) << name << ": tensors must be contiguous, in order";
      std::string expected = expected_bytes(tensor.contiguous(), float_dtype);
      ASSERT_EQ(end - begin, expected.size()) << name;
      EXPECT_TRUE(data.compare(begin, end - begin, expected) == 0) << name << ": bytes differ";
      expected_begin = end;
    }
    EXPECT_EQ(expected_begin, data.size()) << "data section has bytes after the last tensor";
  }
}

TEST(Safetensors, WriteRejectsBadInputAndKeepsTheOldFile) {
  TempDir dir;
  std::string path = (dir.path() / "model.safetensors").string();
  write_safetensors(path, {{"a", Tensor::ones({2})}});
  std::string before = read_file(path);
  expect_error([&] { write_safetensors(path, {{"a", Tensor::ones({1})}, {"a", Tensor::ones({1})}}); },
               {path, "'a' appears twice"});
  expect_error([&] { write_safetensors(path, {{"__metadata__", Tensor::ones({1})}}); }, {path, "__metadata__"});
  expect_error([&] { write_safetensors(path, {{"b", Tensor()}}); }, {path, "'b' is undefined"});
  expect_error([&] { write_safetensors(path, {{"b", Tensor::ones({1})}}, {}, DType::i32); }, {path, "floating"});
  expect_error([&] { write_safetensors((dir.path() / "missing_dir/x.safetensors").string(), {}); }, {"missing_dir"});
  EXPECT_EQ(read_file(path), before);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  // No tensors at all is a valid file: header "{}" padded to 8 bytes.
  std::string empty = (dir.path() / "empty.safetensors").string();
  write_safetensors(empty, {});
  EXPECT_EQ(read_file(empty), std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  EXPECT_TRUE(read_safetensors(empty).tensors.empty());
}

TEST(Safetensors, CudaTensorsAreCopiedToHost) {
  LOOM_SKIP_WITHOUT_GPU();
  TempDir dir;
  std::string path = (dir.path() / "model.safetensors").string();
  Tensor host = testing::random_tensor({3, 5}, 4).to(DType::f32);
  Tensor device = host.to(Device::cuda(0));
  write_safetensors(path, {{"w", device}, {"wt", device.transpose(0, 1)}}, {}, DType::bf16);
  SafetensorsFile back = read_safetensors(path);
  ASSERT_EQ(back.tensors.size(), 2u);
  EXPECT_TRUE(raw_bytes(back.tensors[0].second) == expected_bytes(host, DType::bf16));
  EXPECT_TRUE(raw_bytes(back.tensors[1].second) == expected_bytes(host.transpose(0, 1).contiguous(), DType::bf16));
}

// A file from a header string (length field = its size unless given) and data bytes.
std::string make_file(const std::string& header, const std::string& data, std::optional<uint64_t> length = {}) {
  uint64_t n = length ? *length : header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

TEST(Safetensors, CorruptFilesAreRejectedNamingFileAndTensor) {
  TempDir dir;
  int counter = 0;
  auto check = [&](const std::string& bytes, const std::vector<std::string>& needles) {
    std::string path = (dir.path() / ("bad_" + std::to_string(counter++) + ".safetensors")).string();
    write_file(path, bytes);
    std::vector<std::string> all = needles;
    all.push_back(path);
    expect_error([&] { read_safetensors(path); }, all);
  };
  const std::string data16(16, '\x01');
  // Sanity: this one is valid.
  std::string good = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[2,4],"data_offsets":[8,16]}})";
  std::string good_path = (dir.path() / "good.safetensors").string();
  write_file(good_path, make_file(good, data16));
  EXPECT_EQ(read_safetensors(good_path).tensors.size(), 2u);

  check("abc", {"fewer than the 8-byte header length"});
  check(make_file(good, data16, 1000), {"header length 1000 exceeds"});
  check(make_file(good, data16).substr(0, 40), {"exceeds"});  // truncated inside the header
  check(make_file("{\"a\": [1, 2", ""), {"not valid JSON"});
  check(make_file("[1, 2]", ""), {"not a JSON object"});
  check(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}})",
                  std::string(12, 'x')),
        {"tensor 'b'", "overlaps tensor 'a'"});
  check(make_file(R"({"w":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", std::string(8, 'x')),
        {"tensor 'w'", "'Q7' is not supported"});
  check(make_file(R"({"w":{"dtype":"I8","shape":[8],"data_offsets":[0,8]}})", std::string(8, 'x')),
        {"tensor 'w'", "'I8' is not supported"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, 'x')),
        {"tensor 'w'", "shape (3,)", "span 8 bytes"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(4, 'x')),
        {"tensor 'w'", "not within the 4-byte data section"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", std::string(8, 'x')),
        {"tensor 'w'", "data_offsets [8, 0]"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(12, 'x')),
        {"last 4 bytes of the data section belong to no tensor"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, 'x')),
        {"bytes [0, 4) before tensor 'w'"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::string(8, 'x')),
        {"tensor 'w' shape entry", "not a non-negative integer"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[4294967296, 4294967296],"data_offsets":[0,8]}})",
                  std::string(8, 'x')),
        {"tensor 'w'", "span 8 bytes"});
  check(make_file(R"({"w":{"dtype":"F32","shape":[2]}})", std::string(8, 'x')), {"tensor 'w'", "data_offsets"});
  check(make_file(R"({"__metadata__":{"k":1},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                  std::string(8, 'x')),
        {"__metadata__ entry 'k'", "not a string"});
}

TEST(Safetensors, ReadsUnpaddedHeadersAndAnyEntryOrder) {
  // Other writers need not pad nor list tensors in offset order.
  TempDir dir;
  std::string path = (dir.path() / "other.safetensors").string();
  std::vector<float> a = {1.0f, 2.0f};
  uint16_t b = 0x3f80;
  std::string data(reinterpret_cast<const char*>(&b), 2);
  data.append(reinterpret_cast<const char*>(a.data()), 8);
  write_file(path, make_file(R"({"second":{"dtype":"F32","shape":[2],"data_offsets":[2,10]},)"
                             R"("first":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}})",
                             data));
  SafetensorsFile back = read_safetensors(path);
  ASSERT_EQ(back.tensors.size(), 2u);
  EXPECT_EQ(back.tensors[0].first, "first");  // data order
  EXPECT_EQ(back.tensors[0].second.dim(), 0);
  EXPECT_EQ(back.tensors[0].second.item(), 1.0);
  EXPECT_EQ(back.tensors[1].second.to_vector<float>(), a);
}

}  // namespace
}  // namespace loom
