// Token files: llm.c shards and Megatron indexed datasets — round trips through the
// writers, and every kind of corruption detected with the file named in the message.
#include <numeric>

#include "framework/data.h"
#include "framework/tokenizer.h"
#include "tests/data/data_testing.h"

namespace loom {
namespace {

using testing::TempDir;

std::vector<int32_t> shard_tokens_of(const TokenFile& f) {
  std::vector<int32_t> out(static_cast<size_t>(f.num_tokens()));
  f.read(out.data(), 0, f.num_tokens());
  return out;
}

// ---------------------------------------------------------------- llm.c shards

TEST(TokenShard, RoundTripOfTokenizedText) {
  TempDir dir;
  ByteTokenizer tok;
  std::vector<int32_t> tokens = tok.encode("Hello, wörld! 日本語\n\tend");
  tokens.push_back(tok.end_of_document());
  tok.encode_append(std::string("\0\xff\x80 second", 10), tokens);
  tokens.push_back(tok.end_of_document());
  const std::string path = dir.file("text.bin");
  write_token_shard(path, tokens);

  std::vector<uint8_t> bytes = testing::read_bytes(path);
  ASSERT_EQ(bytes.size(), static_cast<size_t>(kShardHeaderBytes) + 2 * tokens.size());
  int32_t header[3];
  std::memcpy(header, bytes.data(), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], static_cast<int32_t>(tokens.size()));

  TokenShard shard(path, ByteTokenizer::kVocabSize);
  EXPECT_EQ(shard.num_tokens(), static_cast<int64_t>(tokens.size()));
  EXPECT_EQ(shard_tokens_of(shard), tokens);
  std::vector<int64_t> middle(5);
  shard.read(middle.data(), 3, 8);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(middle[i], tokens[3 + i]);
  EXPECT_EQ(tok.decode(shard_tokens_of(shard), "|"), "Hello, wörld! 日本語\n\tend|" + std::string("\0\xff\x80 second", 10) + "|");
  shard.check_all_tokens();
}

TEST(TokenShard, EmptyShardAndFullUint16Range) {
  TempDir dir;
  write_token_shard(dir.file("empty.bin"), {});
  EXPECT_EQ(TokenShard(dir.file("empty.bin")).num_tokens(), 0);
  std::vector<int32_t> edge = {0, 1, 65535, 256, 65534};
  write_token_shard(dir.file("edge.bin"), edge);
  EXPECT_EQ(shard_tokens_of(TokenShard(dir.file("edge.bin"))), edge);
  std::vector<int32_t> too_big = {1, 65536};
  EXPECT_THROWS_WITH(write_token_shard(dir.file("big.bin"), too_big), dir.file("big.bin"), "65536", "position 1");
  std::vector<int32_t> negative = {-1};
  EXPECT_THROWS_WITH(write_token_shard(dir.file("neg.bin"), negative), "token -1");
  EXPECT_FALSE(std::filesystem::exists(dir.file("big.bin")));  // nothing half-written
}

// A valid shard of `n` tokens (values i % 200) as bytes, for corrupting.
std::vector<uint8_t> shard_bytes(int32_t n) {
  std::vector<uint8_t> bytes(static_cast<size_t>(kShardHeaderBytes) + 2 * static_cast<size_t>(n), 0);
  testing::poke<int32_t>(bytes, 0, 20240520);
  testing::poke<int32_t>(bytes, 4, 1);
  testing::poke<int32_t>(bytes, 8, n);
  for (int32_t i = 0; i < n; ++i) testing::poke<uint16_t>(bytes, kShardHeaderBytes + 2 * i, static_cast<uint16_t>(i % 200));
  return bytes;
}

TEST(TokenShard, EveryCorruptionIsNamed) {
  TempDir dir;
  const std::string p = dir.file("bad.bin");
  auto open = [&] { TokenShard shard(p, 257); };

  testing::write_bytes(p, std::vector<uint8_t>(100, 0));
  EXPECT_THROWS_WITH(open(), p, "100 bytes", "shorter than the llm.c header (1024 bytes)");

  std::vector<uint8_t> b = shard_bytes(100);
  testing::poke<int32_t>(b, 0, 12345);
  testing::write_bytes(p, b);
  EXPECT_THROWS_WITH(open(), p, "magic 12345", "expected 20240520");

  b = shard_bytes(100);
  testing::poke<int32_t>(b, 4, 7);
  testing::write_bytes(p, b);
  EXPECT_THROWS_WITH(open(), p, "unsupported llm.c shard version 7", "supported: 1");

  b = shard_bytes(100);
  b.resize(b.size() - 2);
  testing::write_bytes(p, b);
  EXPECT_THROWS_WITH(open(), p, "header says 100 tokens (200 bytes", "198 bytes", "truncated");

  b = shard_bytes(100);
  b.push_back(0);
  testing::write_bytes(p, b);
  EXPECT_THROWS_WITH(open(), p, "header says 100 tokens", "201 bytes", "trailing bytes");

  b = shard_bytes(100);
  testing::poke<int32_t>(b, 8, -5);
  testing::write_bytes(p, b);
  EXPECT_THROWS_WITH(open(), p, "negative token count -5");

  b = shard_bytes(100);
  testing::poke<uint16_t>(b, kShardHeaderBytes + 2 * 42, 300);
  testing::write_bytes(p, b);
  TokenShard shard(p, 257);  // structure is fine; ids are checked as they are read
  std::vector<int64_t> out(100);
  shard.read(out.data(), 0, 42);
  EXPECT_THROWS_WITH(shard.read(out.data(), 40, 50), p, "token 300 at position 42", "vocabulary [0, 257)");
  EXPECT_THROWS_WITH(shard.check_all_tokens(), p, "token 300 at position 42");
  EXPECT_THROWS_WITH(shard.read(out.data(), 90, 101), p, "[90, 101)", "[0, 100)");
  TokenShard unchecked(p);  // no vocabulary: any uint16 is accepted
  unchecked.check_all_tokens();

  EXPECT_THROWS_WITH(TokenShard(dir.file("missing.bin")), dir.file("missing.bin"), "No such file");
  EXPECT_THROWS_WITH(TokenShard(dir.path()), dir.path().string(), "not a regular file");
}

// ---------------------------------------------------------------- Megatron

std::vector<std::vector<int64_t>> some_sequences() {
  return {{5, 6, 7}, {}, {8, 9, 10, 11, 12}, {13}, {14, 15}};
}

TEST(IndexedDataset, RoundTripEveryIntegerDtype) {
  TempDir dir;
  for (IndexedDType dtype : {IndexedDType::u8, IndexedDType::i8, IndexedDType::i16, IndexedDType::u16,
                             IndexedDType::i32, IndexedDType::i64}) {
    SCOPED_TRACE(indexed_dtype_name(dtype));
    const std::string prefix = dir.file("ds_" + std::to_string(static_cast<int>(dtype)));
    write_indexed_dataset(prefix, some_sequences(), dtype, {0, 2, 4, 5});
    IndexedDataset ds(prefix, 100);
    EXPECT_EQ(ds.dtype(), dtype);
    EXPECT_EQ(ds.num_sequences(), 5);
    EXPECT_EQ(ds.num_documents(), 3);
    EXPECT_EQ(ds.document_indices(), (std::vector<int64_t>{0, 2, 4, 5}));
    EXPECT_EQ(ds.num_tokens(), 11);
    EXPECT_EQ(ds.sequence_length(2), 5);
    EXPECT_EQ(ds.sequence_start(2), 3);
    EXPECT_EQ(ds.sequence_start(4), 9);
    std::vector<int64_t> all(11);
    ds.read(all.data(), 0, 11);
    std::vector<int64_t> expected(11);
    std::iota(expected.begin(), expected.end(), 5);
    EXPECT_EQ(all, expected);
    EXPECT_EQ(testing::read_bytes(prefix + ".idx").size(), 34u + 5 * 12 + 4 * 8);
  }
  // Default document indices: one document per sequence.
  write_indexed_dataset(dir.file("plain"), some_sequences());
  EXPECT_EQ(IndexedDataset(dir.file("plain")).num_documents(), 5);
  // Multimodal indexes carry one trailing int8 mode per sequence: accepted, ignored.
  std::vector<uint8_t> idx = testing::read_bytes(dir.file("plain.idx"));
  idx.insert(idx.end(), 5, 0);
  testing::write_bytes(dir.file("plain.idx"), idx);
  EXPECT_EQ(IndexedDataset(dir.file("plain")).num_tokens(), 11);
  EXPECT_THROWS_WITH(write_indexed_dataset(dir.file("x"), {{300}}, IndexedDType::u8), "token 300", "uint8");
}

TEST(IndexedDataset, EveryCorruptionIsNamed) {
  TempDir dir;
  const std::string prefix = dir.file("ds");
  const std::string idx = prefix + ".idx", bin = prefix + ".bin";
  write_indexed_dataset(dir.file("good"), some_sequences(), IndexedDType::i16, {0, 2, 4, 5});
  const std::vector<uint8_t> good_idx = testing::read_bytes(dir.file("good.idx"));
  const std::vector<uint8_t> good_bin = testing::read_bytes(dir.file("good.bin"));
  auto reset = [&] {
    testing::write_bytes(idx, good_idx);
    testing::write_bytes(bin, good_bin);
  };
  auto corrupt_idx = [&](auto edit) {
    reset();
    std::vector<uint8_t> b = good_idx;
    edit(b);
    testing::write_bytes(idx, b);
  };
  auto open = [&] { IndexedDataset ds(prefix, 100); };
  // Layout of good.idx: header 34 bytes, sizes at 34 (5 x i32), pointers at 54 (5 x i64),
  // document indices at 94 (4 x i64), 126 bytes in all.
  ASSERT_EQ(good_idx.size(), 126u);

  reset();
  open();  // sanity: the uncorrupted pair opens
  corrupt_idx([](auto& b) { b.resize(20); });
  EXPECT_THROWS_WITH(open(), idx, "20 bytes", "shorter than the index header (34 bytes)");
  corrupt_idx([](auto& b) { b[0] = 'X'; });
  EXPECT_THROWS_WITH(open(), idx, "magic");
  corrupt_idx([](auto& b) { testing::poke<uint64_t>(b, 9, 2); });
  EXPECT_THROWS_WITH(open(), idx, "unsupported index version 2");
  corrupt_idx([](auto& b) { b[17] = 7; });
  EXPECT_THROWS_WITH(open(), idx, "float32 (code 7)", "not an integer token type");
  corrupt_idx([](auto& b) { b[17] = 9; });
  EXPECT_THROWS_WITH(open(), idx, "unknown dtype code 9");
  corrupt_idx([](auto& b) { b.pop_back(); });
  EXPECT_THROWS_WITH(open(), idx, "needs 126 bytes", "file has 125", "truncated");
  corrupt_idx([](auto& b) { b.push_back(0); });
  EXPECT_THROWS_WITH(open(), idx, "file has 127", "trailing bytes");
  corrupt_idx([](auto& b) { testing::poke<uint64_t>(b, 18, uint64_t{1} << 50); });
  EXPECT_THROWS_WITH(open(), idx, "implausible counts");
  corrupt_idx([](auto& b) { testing::poke<int32_t>(b, 34 + 4, -1); });
  EXPECT_THROWS_WITH(open(), idx, "sequence 1 has negative size -1");
  corrupt_idx([](auto& b) { testing::poke<int64_t>(b, 54 + 8 * 3, 18); });
  EXPECT_THROWS_WITH(open(), idx, "sequence 3 starts at byte 18", "expected 16");
  corrupt_idx([](auto& b) { testing::poke<int64_t>(b, 94 + 8 * 3, 4); });
  EXPECT_THROWS_WITH(open(), idx, "document indices run from 0 to 4, expected 0 to 5");
  corrupt_idx([](auto& b) { testing::poke<int64_t>(b, 94 + 8 * 2, 1); });
  EXPECT_THROWS_WITH(open(), idx, "document index 2 is 1", "[2, 5]");

  reset();
  std::vector<uint8_t> b = good_bin;
  b.pop_back();
  testing::write_bytes(bin, b);
  EXPECT_THROWS_WITH(open(), bin, "describes 22 bytes", "file has 21", "truncated");
  b = good_bin;
  b.insert(b.end(), 2, 0);
  testing::write_bytes(bin, b);
  EXPECT_THROWS_WITH(open(), bin, "file has 24", "trailing bytes");

  reset();
  b = good_bin;
  testing::poke<int16_t>(b, 2 * 4, -3);  // stream token 4
  testing::write_bytes(bin, b);
  IndexedDataset negative(prefix, 100);
  std::vector<int32_t> out(11);
  EXPECT_THROWS_WITH(negative.read(out.data(), 0, 11), bin, "token -3 at position 4");
  testing::poke<int16_t>(b, 2 * 4, 100);
  testing::write_bytes(bin, b);
  EXPECT_THROWS_WITH(IndexedDataset(prefix, 100).check_all_tokens(), bin, "token 100 at position 4", "[0, 100)");

  std::filesystem::remove(bin);
  EXPECT_THROWS_WITH(open(), bin, "No such file");
  std::filesystem::remove(idx);
  EXPECT_THROWS_WITH(open(), idx, "No such file");
}

TEST(OpenTokenFile, RecognizesMegatronByItsIndex) {
  TempDir dir;
  write_indexed_dataset(dir.file("mega"), some_sequences());
  write_token_shard(dir.file("shard.bin"), std::vector<int32_t>{1, 2, 3});
  for (const std::string& entry : {dir.file("mega"), dir.file("mega.idx"), dir.file("mega.bin")}) {
    auto f = open_token_file(entry);
    EXPECT_NE(dynamic_cast<IndexedDataset*>(f.get()), nullptr) << entry;
    EXPECT_EQ(f->num_tokens(), 11);
  }
  auto shard = open_token_file(dir.file("shard.bin"));
  EXPECT_NE(dynamic_cast<TokenShard*>(shard.get()), nullptr);
  EXPECT_EQ(shard->num_tokens(), 3);
}

}  // namespace
}  // namespace loom
