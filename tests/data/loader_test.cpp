// DataLoader: windows and targets, deterministic shuffles, exact resume from a saved state,
// dp sharding (the union over P ranks is the 1-rank batch, in order), epoch wrap, eval mode,
// and the errors for data that is too small or a state that does not fit.
#include <nlohmann/json.hpp>
#include <set>

#include "framework/data.h"
#include "tests/data/data_testing.h"

namespace loom {
namespace {

using testing::TempDir;

// A source of n tokens whose value is their stream position, over three shards.
std::shared_ptr<const TokenSource> counting_source(const TempDir& dir, int64_t n) {
  std::vector<std::string> paths;
  const int64_t sizes[3] = {n / 3, n / 2 - n / 3, n - n / 2};
  int32_t next = 0;
  for (int i = 0; i < 3; ++i) {
    std::vector<int32_t> tokens(static_cast<size_t>(sizes[i]));
    for (auto& t : tokens) t = next++;
    std::string name = "c";  // built in steps: GCC 12 warns (-Wrestrict, a false positive) on "c" + to_string
    name += std::to_string(i);
    name += ".bin";
    paths.push_back(dir.file(name));
    write_token_shard(paths.back(), tokens);
  }
  return std::make_shared<TokenSource>(paths);
}

DataLoaderOptions options(int64_t T, int64_t Bg, uint64_t seed, int64_t rank = 0, int64_t P = 1) {
  DataLoaderOptions o;
  o.seq_len = T;
  o.global_batch = Bg;
  o.seed = seed;
  o.dp_rank = rank;
  o.dp_size = P;
  return o;
}

std::vector<int64_t> values(const Tensor& t) { return t.to_vector<int64_t>(); }

// Window index of every row (token values are positions, so row b starts at w*T).
std::vector<int64_t> windows_of(const Batch& batch, int64_t T) {
  std::vector<int64_t> w;
  const int64_t B = batch.inputs.size(0);
  std::vector<int64_t> v = values(batch.inputs);
  for (int64_t b = 0; b < B; ++b) w.push_back(v[b * T] / T);
  return w;
}

TEST(WindowPermutation, IsADeterministicPermutationPerSeedAndEpoch) {
  std::vector<uint32_t> p = window_permutation(1000, 7, 0);
  std::set<uint32_t> seen(p.begin(), p.end());
  EXPECT_EQ(seen.size(), 1000u);
  EXPECT_EQ(*seen.rbegin(), 999u);
  EXPECT_EQ(p, window_permutation(1000, 7, 0));
  EXPECT_NE(p, window_permutation(1000, 8, 0));
  EXPECT_NE(p, window_permutation(1000, 7, 1));
  EXPECT_TRUE(window_permutation(0, 1, 0).empty());
  EXPECT_EQ(window_permutation(1, 1, 0), std::vector<uint32_t>{0});
  // Roughly uniform: element 0 lands in each half about equally often over many epochs.
  int first_half = 0;
  for (int e = 0; e < 400; ++e) first_half += window_permutation(10, 3, e)[0] < 5;
  EXPECT_GT(first_half, 140);
  EXPECT_LT(first_half, 260);
}

TEST(DataLoader, BatchesAreShiftedWindowsOfTheStream) {
  TempDir dir;
  const int64_t T = 8, N = 1000;
  DataLoader loader(counting_source(dir, N), options(T, 4, 1));
  EXPECT_EQ(loader.num_windows(), (N - 1) / T);
  EXPECT_EQ(loader.steps_per_epoch(), (N - 1) / T / 4);
  Batch batch = loader.next();
  ASSERT_EQ(batch.inputs.shape(), (Shape{4, T}));
  ASSERT_EQ(batch.targets.shape(), (Shape{4, T}));
  EXPECT_EQ(batch.inputs.dtype(), DType::i64);
  std::vector<int64_t> in = values(batch.inputs), tg = values(batch.targets);
  for (int64_t b = 0; b < 4; ++b) {
    const int64_t start = in[b * T];
    EXPECT_EQ(start % T, 0);
    for (int64_t t = 0; t < T; ++t) {
      EXPECT_EQ(in[b * T + t], start + t);
      EXPECT_EQ(tg[b * T + t], start + t + 1);
    }
  }
}

TEST(DataLoader, SameSeedSameBatchesDifferentSeedDifferent) {
  TempDir dir;
  auto source = counting_source(dir, 5000);
  DataLoader a(source, options(16, 4, 42)), b(source, options(16, 4, 42)), c(source, options(16, 4, 43));
  bool any_different = false;
  for (int i = 0; i < 10; ++i) {
    Batch ba = a.next(), bb = b.next(), bc = c.next();
    EXPECT_EQ(values(ba.inputs), values(bb.inputs));
    EXPECT_EQ(values(ba.targets), values(bb.targets));
    any_different |= values(ba.inputs) != values(bc.inputs);
  }
  EXPECT_TRUE(any_different);
}

TEST(DataLoader, ResumeFromSavedStateGivesTheSameBatches) {
  TempDir dir;
  auto source = counting_source(dir, 2000);
  DataLoader original(source, options(10, 6, 9));  // 199 windows, 33 steps per epoch
  for (int i = 0; i < 30; ++i) original.next();
  const std::string saved = original.state().to_json().dump();
  DataLoaderState restored = DataLoaderState::from_json(nlohmann::json::parse(saved));
  EXPECT_EQ(restored, original.state());
  EXPECT_EQ(restored.epoch, 0);
  EXPECT_EQ(restored.step, 30);

  DataLoader resumed(source, options(10, 6, 9));
  resumed.set_state(restored);
  for (int i = 0; i < 10; ++i) {  // crosses into epoch 1
    Batch x = original.next(), y = resumed.next();
    EXPECT_EQ(x.epoch, y.epoch);
    EXPECT_EQ(x.step, y.step);
    ASSERT_EQ(values(x.inputs), values(y.inputs)) << "batch " << i;
  }
  EXPECT_EQ(original.state(), resumed.state());
  EXPECT_EQ(resumed.state().epoch, 1);
}

TEST(DataLoader, UnionOverDpRanksIsTheOneRankBatch) {
  TempDir dir;
  auto source = counting_source(dir, 3000);
  const int64_t T = 12, Bg = 6;
  DataLoader single(source, options(T, Bg, 5));
  const int64_t steps = single.steps_per_epoch() + 3;  // into the second epoch
  std::vector<std::vector<int64_t>> expected;
  for (int64_t s = 0; s < steps; ++s) expected.push_back(values(single.next().inputs));
  for (int64_t P : {1, 2, 3}) {
    std::vector<DataLoader> ranks;
    for (int64_t r = 0; r < P; ++r) ranks.emplace_back(source, options(T, Bg, 5, r, P));
    EXPECT_EQ(ranks[0].local_batch(), Bg / P);
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<int64_t> joined;
      for (auto& rank : ranks) {
        Batch b = rank.next();
        ASSERT_EQ(b.inputs.shape(), (Shape{Bg / P, T}));
        std::vector<int64_t> v = values(b.inputs);
        joined.insert(joined.end(), v.begin(), v.end());
      }
      ASSERT_EQ(joined, expected[s]) << "P = " << P << ", step " << s;
    }
  }
}

TEST(DataLoader, EpochsVisitEachWindowOnceThenReshuffle) {
  TempDir dir;
  const int64_t T = 5, Bg = 4;
  DataLoader loader(counting_source(dir, 203), options(T, Bg, 11));  // 40 windows, 10 steps
  ASSERT_EQ(loader.steps_per_epoch(), 10);
  std::vector<int64_t> epoch0, epoch1;
  for (int s = 0; s < 10; ++s) {
    auto w = windows_of(loader.next(), T);
    epoch0.insert(epoch0.end(), w.begin(), w.end());
  }
  EXPECT_EQ(loader.state().epoch, 1);
  EXPECT_EQ(loader.state().step, 0);
  for (int s = 0; s < 10; ++s) {
    auto w = windows_of(loader.next(), T);
    epoch1.insert(epoch1.end(), w.begin(), w.end());
  }
  EXPECT_EQ(std::set<int64_t>(epoch0.begin(), epoch0.end()).size(), 40u);
  EXPECT_EQ(std::set<int64_t>(epoch1.begin(), epoch1.end()).size(), 40u);
  EXPECT_NE(epoch0, epoch1);
  EXPECT_EQ(windows_of(loader.batch_at(0, 3), T), std::vector<int64_t>(epoch0.begin() + 12, epoch0.begin() + 16));
  EXPECT_EQ(loader.state().epoch, 2);  // batch_at does not move the state
}

TEST(DataLoader, EvalModeIteratesTheSameWindowsInOrder) {
  TempDir dir;
  const int64_t T = 7;
  DataLoaderOptions o = options(T, 3, 99);
  o.shuffle = false;
  DataLoader eval(counting_source(dir, 100), o);  // 14 windows, 4 steps
  ASSERT_EQ(eval.steps_per_epoch(), 4);
  std::vector<int64_t> pass1, pass2;
  for (int s = 0; s < 4; ++s) {
    auto w = windows_of(eval.next(), T);
    pass1.insert(pass1.end(), w.begin(), w.end());
  }
  eval.reset();
  for (int s = 0; s < 2; ++s) {
    auto w = windows_of(eval.next(), T);
    pass2.insert(pass2.end(), w.begin(), w.end());
  }
  eval.reset();
  for (int s = 0; s < 2; ++s) {
    auto w = windows_of(eval.next(), T);
    pass2.insert(pass2.end(), w.begin(), w.end());
  }
  std::vector<int64_t> in_order(12);
  for (int i = 0; i < 12; ++i) in_order[i] = i;
  EXPECT_EQ(pass1, in_order);
  EXPECT_EQ(pass2, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5}));
}

TEST(DataLoader, ErrorsForSmallDataAndMismatchedState) {
  TempDir dir;
  auto source = counting_source(dir, 40);  // 39 / 8 = 4 windows
  EXPECT_THROWS_WITH(DataLoader(source, options(8, 5, 0)), "dataset too small for one batch", dir.file("c0.bin"),
                     "has 40 tokens", "4 windows", "5 rows needs 41 tokens");
  EXPECT_THROWS_WITH(DataLoader(source, options(8, 4, 0, 0, 3)), "global_batch 4 is not divisible by dp_size 3");
  EXPECT_THROWS_WITH(DataLoader(source, options(8, 4, 0, 2, 2)), "dp_rank 2 outside [0, dp_size = 2)");
  EXPECT_THROWS_WITH(DataLoader(source, options(0, 4, 0)), "seq_len must be >= 1, got 0");

  DataLoader loader(source, options(8, 2, 3));
  DataLoaderState s = loader.state();
  s.seq_len = 9;
  EXPECT_THROWS_WITH(loader.set_state(s), "seq_len 9", "this loader has 8");
  s = loader.state();
  s.num_tokens = 41;
  EXPECT_THROWS_WITH(loader.set_state(s), "saved for 41 tokens", "has 40");
  s = loader.state();
  s.seed = 4;
  EXPECT_THROWS_WITH(loader.set_state(s), "seed 4", "this loader has 3");
  s = loader.state();
  s.step = 2;
  EXPECT_THROWS_WITH(loader.set_state(s), "step 2", "steps [0, 2)");
  EXPECT_THROWS_WITH(DataLoaderState::from_json(nlohmann::json{{"epoch", 1}}), "lacks integer key 'step'");
}

}  // namespace
}  // namespace loom
