// Byte tokenizer round trips, document splitting, prepare_text_corpus (plain and gzip
// inputs, shards, validation split, stale-shard clean-up) and the Jargon File demo corpus.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "framework/data.h"
#include "framework/tokenizer.h"
#include "tests/data/data_testing.h"

namespace loom {
namespace {

using testing::TempDir;

TEST(ByteTokenizer, RoundTripsAnyBytes) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 257);
  EXPECT_EQ(tok.end_of_document(), 256);
  for (std::string text : {std::string("plain ASCII\n"), std::string("héllo wörld — 日本語 🙂"), std::string()}) {
    std::vector<int32_t> ids = tok.encode(text);
    EXPECT_EQ(ids.size(), text.size());
    EXPECT_EQ(tok.decode(ids), text);
  }
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes.push_back(static_cast<char>(b));
  std::vector<int32_t> ids = tok.encode(all_bytes);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[b], b);
  EXPECT_EQ(tok.decode(ids), all_bytes);
  std::string invalid_utf8 = "\xc3\x28 \xff\xfe";
  EXPECT_EQ(tok.decode(tok.encode(invalid_utf8)), invalid_utf8);
  EXPECT_EQ(tok.encode("é"), (std::vector<int32_t>{0xc3, 0xa9}));
}

TEST(ByteTokenizer, EndOfDocumentDecodesToAVisibleMarker) {
  ByteTokenizer tok;
  std::vector<int32_t> ids = tok.encode("one");
  ids.push_back(256);
  tok.encode_append("two", ids);
  EXPECT_EQ(tok.decode(ids), "one<|endoftext|>two");
  EXPECT_EQ(tok.decode(ids, "\n"), "one\ntwo");
  std::vector<int64_t> wide(ids.begin(), ids.end());
  EXPECT_EQ(tok.decode(wide), "one<|endoftext|>two");
  EXPECT_EQ(tok.encode("<|endoftext|>").size(), 13u);  // text never becomes id 256
  EXPECT_THROWS_WITH(tok.decode(std::vector<int32_t>{65, 257}), "id 257 at position 1", "[0, 257)");
  EXPECT_THROWS_WITH(tok.decode(std::vector<int64_t>{-1}), "id -1 at position 0");
}

std::string make_text(int paragraphs, uint64_t seed) {
  std::string text;
  uint64_t x = seed;
  for (int p = 0; p < paragraphs; ++p) {
    const int lines = 1 + static_cast<int>(x % 5);
    for (int l = 0; l < lines; ++l) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      text += "   paragraph " + std::to_string(p) + " line " + std::to_string(l) + " ünïcode " +
              std::to_string(x >> 40) + "\n";
    }
    text += (p % 3 == 0) ? "\n \n" : "\n";
  }
  return text;
}

TEST(SplitDocuments, CutsAtParagraphsAndKeepsEveryByte) {
  const std::string text = make_text(200, 1);
  std::vector<std::string> docs = split_documents(text, 500);
  ASSERT_GT(docs.size(), 5u);
  std::string joined;
  for (size_t i = 0; i < docs.size(); ++i) {
    joined += docs[i];
    if (i + 1 < docs.size()) {
      EXPECT_GE(docs[i].size(), 500u);
      EXPECT_LE(docs[i].size(), 2000u);
      EXPECT_EQ(docs[i].back(), '\n');
      EXPECT_EQ(docs[i + 1].substr(0, 13), "   paragraph ") << "doc " << i + 1 << " starts mid-paragraph";
    }
  }
  EXPECT_EQ(joined, text);
  EXPECT_TRUE(split_documents("", 100).empty());
  EXPECT_EQ(split_documents("short", 100), std::vector<std::string>{"short"});
  // No blank lines: cut at a line end after 4 x target; no newlines at all: every 16 x target.
  std::string lines;
  for (int i = 0; i < 100; ++i) lines += "line " + std::to_string(i) + "\n";
  for (const auto& d : split_documents(lines, 20)) EXPECT_EQ(d.back(), '\n');
  std::vector<std::string> blob = split_documents(std::string(1000, 'x'), 10);
  EXPECT_EQ(blob.size(), 7u);
  EXPECT_EQ(blob[0].size(), 160u);
}

int32_t count_eod(const std::vector<int32_t>& ids) {
  return static_cast<int32_t>(std::count(ids.begin(), ids.end(), ByteTokenizer::kEndOfDocument));
}

std::vector<int32_t> read_all(const std::vector<std::string>& shards) {
  if (shards.empty()) return {};
  TokenSource source(shards, ByteTokenizer::kVocabSize);
  std::vector<int32_t> ids(static_cast<size_t>(source.num_tokens()));
  source.read(ids.data(), 0, source.num_tokens());
  return ids;
}

TEST(PrepareTextCorpus, WritesShardsThatDecodeBackToTheInputs) {
  TempDir dir;
  const std::string a = make_text(300, 2), b = make_text(100, 3);
  testing::write_bytes(dir.file("a.txt"), std::vector<uint8_t>(a.begin(), a.end()));
  testing::write_bytes(dir.file("b.txt"), std::vector<uint8_t>(b.begin(), b.end()));
  std::vector<std::string> inputs = {dir.file("a.txt"), dir.file("b.txt")};
  // gzip input through `gzip -dc`, when gzip is here to make one.
  const std::string gz_cmd = "gzip -c " + dir.file("b.txt") + " > " + dir.file("b.txt.gz");
  const bool have_gzip = std::system(gz_cmd.c_str()) == 0;
  if (have_gzip) inputs[1] = dir.file("b.txt.gz");

  const std::string out = dir.file("out");
  PreparedCorpus c = prepare_text_corpus(inputs, out, "tiny", 0.1, 4000, 1000);
  EXPECT_EQ(c.input_bytes, static_cast<int64_t>(a.size() + b.size()));
  const int64_t docs = c.train_documents + c.val_documents;
  EXPECT_EQ(c.val_documents, std::llround(0.1 * static_cast<double>(docs)));
  EXPECT_EQ(c.train_tokens + c.val_tokens, static_cast<int64_t>(a.size() + b.size()) + docs);
  ASSERT_EQ(c.train_shards.size(), static_cast<size_t>((c.train_tokens + 3999) / 4000));
  EXPECT_EQ(c.train_shards[0], out + "/tiny_train_000000.bin");
  EXPECT_EQ(c.val_shards[0], out + "/tiny_val_000000.bin");
  for (const auto& s : c.train_shards) EXPECT_LE(TokenShard(s).num_tokens(), 4000);

  std::vector<int32_t> train = read_all(c.train_shards), val = read_all(c.val_shards);
  EXPECT_EQ(static_cast<int64_t>(train.size()), c.train_tokens);
  EXPECT_EQ(count_eod(train), c.train_documents);
  EXPECT_EQ(count_eod(val), c.val_documents);
  EXPECT_EQ(train.back(), 256);
  EXPECT_EQ(val.back(), 256);
  ByteTokenizer tok;
  EXPECT_EQ(tok.decode(train, "") + tok.decode(val, ""), a + b);

  // The trainer's path: a glob over the output feeds a loader.
  auto source = std::make_shared<TokenSource>(out + "/tiny_train_*.bin", tok.vocab_size());
  EXPECT_EQ(source->num_tokens(), c.train_tokens);
  DataLoaderOptions o;
  o.seq_len = 64;
  o.global_batch = 4;
  DataLoader loader(source, o);
  EXPECT_EQ(loader.next().inputs.shape(), (Shape{4, 64}));

  // Re-running with bigger shards removes the earlier run's extra shards.
  PreparedCorpus again = prepare_text_corpus(inputs, out, "tiny", 0.1, 1'000'000, 1000);
  EXPECT_EQ(again.train_shards.size(), 1u);
  EXPECT_EQ(again.removed_stale.size(),
            (c.train_shards.size() - again.train_shards.size()) + (c.val_shards.size() - again.val_shards.size()));
  EXPECT_EQ(TokenSource(out + "/tiny_train_*.bin").num_files(), 1u);
  EXPECT_EQ(read_all(again.train_shards), train);
  if (!have_gzip) GTEST_SKIP() << "gzip not found: the .gz input path was not exercised";
}

TEST(PrepareTextCorpus, ErrorsAndEdgeCases) {
  TempDir dir;
  EXPECT_THROWS_WITH(prepare_text_corpus({dir.file("missing.txt")}, dir.file("o"), "x"), "input file not found",
                     dir.file("missing.txt"));
  testing::write_bytes(dir.file("one.txt"), {'h', 'i', '\n'});
  EXPECT_THROWS_WITH(prepare_text_corpus({dir.file("one.txt")}, dir.file("o"), "x", 0.05), "1 document",
                     "set val_fraction 0");
  PreparedCorpus no_val = prepare_text_corpus({dir.file("one.txt")}, dir.file("o"), "x", 0.0);
  EXPECT_EQ(no_val.train_tokens, 4);
  EXPECT_TRUE(no_val.val_shards.empty());
  EXPECT_THROWS_WITH(prepare_text_corpus({dir.file("one.txt")}, dir.file("o"), "x", 1.0), "val_fraction 1");
  testing::write_bytes(dir.file("bad.gz"), {0x1f, 0x8b, 1, 2, 3});
  EXPECT_THROWS_WITH(read_text_file(dir.file("bad.gz")), dir.file("bad.gz"), "gzip");
}

TEST(DemoCorpus, JargonFilePreparesToOverAMillionTokens) {
  std::string path;
  try {
    path = find_demo_corpus();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("jargon-text"), std::string::npos) << e.what();
    GTEST_SKIP() << "Jargon File absent (Debian package jargon-text not installed): " << e.what();
  }
  TempDir dir;
  PreparedCorpus c = prepare_text_corpus({path}, dir.path(), "demo");
  EXPECT_GT(c.train_tokens + c.val_tokens, 1'000'000);
  EXPECT_GT(c.val_documents, 0);
  EXPECT_EQ(c.train_shards.size(), 1u);
  ByteTokenizer tok;
  std::vector<int32_t> head(200);
  TokenShard(c.train_shards[0], tok.vocab_size()).read(head.data(), 0, 200);
  EXPECT_NE(tok.decode(head).find("Jargon File"), std::string::npos);
}

}  // namespace
}  // namespace loom
