// TokenSource: several files (llm.c shards, Megatron datasets, globs, comma lists) read as
// one stream; every sub-range read across file boundaries matches the concatenation.
#include "framework/data.h"
#include "tests/data/data_testing.h"

namespace loom {
namespace {

using testing::TempDir;

// Writes shards of the given sizes holding consecutive values start, start+1, ...
std::vector<std::string> write_counting_shards(const TempDir& dir, const std::string& name,
                                               const std::vector<int>& sizes, int32_t start = 0) {
  std::vector<std::string> paths;
  int32_t next = start;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::vector<int32_t> tokens(static_cast<size_t>(sizes[i]));
    for (auto& t : tokens) t = next++;
    char file[64];
    std::snprintf(file, sizeof(file), "%s_%06zu.bin", name.c_str(), i);
    paths.push_back(dir.file(file));
    write_token_shard(paths.back(), tokens);
  }
  return paths;
}

void expect_all_ranges(const TokenSource& source, int64_t first_value) {
  const int64_t n = source.num_tokens();
  for (int64_t b = 0; b <= n; ++b) {
    for (int64_t e = b; e <= n; ++e) {
      std::vector<int64_t> out(static_cast<size_t>(e - b), -1);
      source.read(out.data(), b, e);
      for (int64_t i = b; i < e; ++i) ASSERT_EQ(out[i - b], first_value + i) << "range [" << b << ", " << e << ")";
    }
  }
}

TEST(TokenSource, ConcatenatesShardsAcrossBoundaries) {
  TempDir dir;
  // An empty shard in the middle and a one-token shard exercise the boundary walk.
  std::vector<std::string> paths = write_counting_shards(dir, "part", {7, 0, 1, 12, 5});
  TokenSource by_glob(dir.file("part_*.bin"));
  EXPECT_EQ(by_glob.num_files(), 5u);
  EXPECT_EQ(by_glob.num_tokens(), 25);
  expect_all_ranges(by_glob, 0);

  TokenSource by_list(paths[0] + ", " + paths[1] + "," + paths[2] + "," + paths[3] + "," + paths[4]);
  expect_all_ranges(by_list, 0);
  TokenSource by_vector(paths);
  expect_all_ranges(by_vector, 0);

  Tensor t = by_vector.read(5, 9);  // (4)
  EXPECT_EQ(t.dtype(), DType::i64);
  EXPECT_EQ(t.to_vector<int64_t>(), (std::vector<int64_t>{5, 6, 7, 8}));
  std::vector<int32_t> narrow(25);
  by_vector.read(narrow.data(), 0, 25);
  for (int i = 0; i < 25; ++i) EXPECT_EQ(narrow[i], i);
  EXPECT_NE(by_glob.describe().find("5 files, 25 tokens"), std::string::npos) << by_glob.describe();
}

TEST(TokenSource, MixesShardsAndMegatronDatasets) {
  TempDir dir;
  std::vector<std::string> shard = write_counting_shards(dir, "a", {4});
  // Megatron dataset continuing the count at 4: sequences {4,5,6}, {7}, {8,9}.
  write_indexed_dataset(dir.file("m"), {{4, 5, 6}, {7}, {8, 9}}, IndexedDType::i32);
  std::vector<std::string> tail = write_counting_shards(dir, "z", {3}, 10);
  TokenSource source(shard[0] + "," + dir.file("m") + "," + tail[0], 1000);
  EXPECT_EQ(source.num_files(), 3u);
  EXPECT_EQ(source.num_tokens(), 13);
  expect_all_ranges(source, 0);
  // A glob over the folder sees m.idx and m.bin but opens the dataset once.
  TokenSource globbed(dir.file("m.*"));
  EXPECT_EQ(globbed.num_files(), 1u);
  EXPECT_EQ(globbed.num_tokens(), 6);
}

TEST(TokenSource, ErrorsNameWhatIsMissingOrWrong) {
  TempDir dir;
  std::vector<std::string> paths = write_counting_shards(dir, "s", {10, 10});
  EXPECT_THROWS_WITH(TokenSource(dir.file("nothing_*.bin")), "no token files match", dir.file("nothing_*.bin"));
  EXPECT_THROWS_WITH(TokenSource(paths[0] + "," + dir.file("gone.bin")), dir.file("gone.bin"), "No such file");
  EXPECT_THROWS_WITH(TokenSource(std::string(" , ")), "empty token source spec");
  TokenSource small_vocab(dir.file("s_*.bin"), 15);
  std::vector<int64_t> out(20);
  small_vocab.read(out.data(), 0, 15);
  EXPECT_THROWS_WITH(small_vocab.read(out.data(), 8, 20), paths[1], "token 15 at position 5", "[0, 15)");
  EXPECT_THROWS_WITH(small_vocab.check_all_tokens(), paths[1]);
  EXPECT_THROWS_WITH(small_vocab.read(out.data(), 5, 21), "[5, 21)", "[0, 20)");
}

}  // namespace
}  // namespace loom
