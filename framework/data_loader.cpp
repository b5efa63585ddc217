// DataLoader: the token stream cut into windows of T+1 tokens (stride T), shuffled per
// epoch by a Philox-driven Fisher-Yates permutation, served as (B, T) inputs/targets with
// the global batch split rank-major over the dp group. Everything about the order is a
// function of (seed, epoch, step), so a saved (epoch, step) resumes exactly.
#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "framework/data.h"
#include "framework/error.h"
#include "framework/random.h"

namespace loom {
namespace {

// High word of the Philox counter reserved for data shuffling ("data"), so the shuffle
// never reuses the numbers another user of the same seed draws (they start at counter 0).
constexpr uint64_t kShuffleStream = uint64_t{0x64617461} << 32;

}  // namespace

std::vector<uint32_t> window_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  LOOM_CHECK(n >= 0 && n <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()))
      << "window_permutation: " << n << " windows, supported up to 2^32 - 1";
  LOOM_CHECK(epoch >= 0 && epoch < (int64_t{1} << 32)) << "window_permutation: epoch " << epoch << " out of range";
  std::vector<uint32_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[i] = static_cast<uint32_t>(i);
  const uint64_t counter_hi = kShuffleStream | static_cast<uint64_t>(epoch);
  for (int64_t i = n - 1; i > 0; --i) {
    uint32_t bits[4];
    philox4x32(seed, static_cast<uint64_t>(i), counter_hi, bits);
    const uint64_t r = static_cast<uint64_t>(bits[0]) | (static_cast<uint64_t>(bits[1]) << 32);
    // j uniform in [0, i] by a 64x64 -> 128-bit multiply (bias below (i+1) / 2^64).
    const auto j = static_cast<int64_t>((static_cast<unsigned __int128>(r) * static_cast<uint64_t>(i + 1)) >> 64);
    std::swap(perm[i], perm[j]);
  }
  return perm;
}

// ---------------------------------------------------------------- state

nlohmann::json DataLoaderState::to_json() const {
  return nlohmann::json{{"epoch", epoch},           {"step", step},
                        {"seed", seed},             {"seq_len", seq_len},
                        {"global_batch", global_batch}, {"num_tokens", num_tokens}};
}

DataLoaderState DataLoaderState::from_json(const nlohmann::json& j) {
  LOOM_CHECK(j.is_object()) << "data loader state must be a JSON object, got " << j.dump();
  auto get = [&](const char* key) -> const nlohmann::json& {
    LOOM_CHECK(j.contains(key) && j.at(key).is_number_integer())
        << "data loader state lacks integer key '" << key << "': " << j.dump();
    return j.at(key);
  };
  DataLoaderState s;
  s.epoch = get("epoch").get<int64_t>();
  s.step = get("step").get<int64_t>();
  s.seed = get("seed").get<uint64_t>();
  s.seq_len = get("seq_len").get<int64_t>();
  s.global_batch = get("global_batch").get<int64_t>();
  s.num_tokens = get("num_tokens").get<int64_t>();
  return s;
}

// ---------------------------------------------------------------- loader

DataLoader::DataLoader(std::shared_ptr<const TokenSource> source, const DataLoaderOptions& options)
    : source_(std::move(source)), options_(options) {
  LOOM_CHECK(source_ != nullptr) << "DataLoader needs a token source";
  const int64_t T = options_.seq_len, Bg = options_.global_batch, P = options_.dp_size;
  LOOM_CHECK(T >= 1) << "DataLoader: seq_len must be >= 1, got " << T;
  LOOM_CHECK(Bg >= 1) << "DataLoader: global_batch must be >= 1, got " << Bg;
  LOOM_CHECK(P >= 1 && 0 <= options_.dp_rank && options_.dp_rank < P)
      << "DataLoader: dp_rank " << options_.dp_rank << " outside [0, dp_size = " << P << ")";
  LOOM_CHECK(Bg % P == 0) << "DataLoader: global_batch " << Bg << " is not divisible by dp_size " << P;
  const int64_t N = source_->num_tokens();
  num_windows_ = N >= 1 ? (N - 1) / T : 0;
  steps_per_epoch_ = num_windows_ / Bg;
  LOOM_CHECK(steps_per_epoch_ >= 1) << "dataset too small for one batch: " << source_->describe() << " has " << N
                                    << " tokens = " << num_windows_ << " windows of " << T + 1 << " tokens (stride "
                                    << T << "); one global batch of " << Bg << " rows needs " << Bg * T + 1
                                    << " tokens";
  if (options_.shuffle) {
    LOOM_CHECK(num_windows_ <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()))
        << "DataLoader: " << num_windows_ << " windows in " << source_->describe()
        << " exceed the shuffle's 2^32 - 1; use a longer seq_len or fewer files";
  }
}

int64_t DataLoader::window_at(int64_t epoch, int64_t step, int64_t row) {
  LOOM_CHECK(epoch >= 0 && 0 <= step && step < steps_per_epoch_)
      << "DataLoader: (epoch " << epoch << ", step " << step << ") outside epochs >= 0, steps [0, "
      << steps_per_epoch_ << ")";
  LOOM_CHECK(0 <= row && row < options_.global_batch)
      << "DataLoader: row " << row << " outside [0, " << options_.global_batch << ")";
  const int64_t position = step * options_.global_batch + row;
  if (!options_.shuffle) return position;
  if (cached_epoch_ != epoch) {
    permutation_ = window_permutation(num_windows_, options_.seed, epoch);
    cached_epoch_ = epoch;
  }
  return permutation_[static_cast<size_t>(position)];
}

Batch DataLoader::batch_at(int64_t epoch, int64_t step) {
  const int64_t T = options_.seq_len, B = local_batch();
  Batch batch;
  batch.epoch = epoch;
  batch.step = step;
  batch.inputs = Tensor::empty({B, T}, DType::i64);   // (B, T)
  batch.targets = Tensor::empty({B, T}, DType::i64);  // (B, T)
  int64_t* inputs = batch.inputs.data<int64_t>();
  int64_t* targets = batch.targets.data<int64_t>();
  std::vector<int64_t> window(static_cast<size_t>(T + 1));  // (T + 1)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t w = window_at(epoch, step, options_.dp_rank * B + b);
    source_->read(window.data(), w * T, w * T + T + 1);
    std::memcpy(inputs + b * T, window.data(), sizeof(int64_t) * T);
    std::memcpy(targets + b * T, window.data() + 1, sizeof(int64_t) * T);
  }
  return batch;
}

Batch DataLoader::next() {
  Batch batch = batch_at(epoch_, step_);
  if (++step_ == steps_per_epoch_) {
    ++epoch_;
    step_ = 0;
  }
  return batch;
}

DataLoaderState DataLoader::state() const {
  DataLoaderState s;
  s.epoch = epoch_;
  s.step = step_;
  s.seed = options_.seed;
  s.seq_len = options_.seq_len;
  s.global_batch = options_.global_batch;
  s.num_tokens = source_->num_tokens();
  return s;
}

void DataLoader::set_state(const DataLoaderState& s) {
  LOOM_CHECK(s.seq_len == options_.seq_len) << "data loader state was saved for seq_len " << s.seq_len
                                            << ", this loader has " << options_.seq_len;
  LOOM_CHECK(s.global_batch == options_.global_batch) << "data loader state was saved for global_batch "
                                                      << s.global_batch << ", this loader has "
                                                      << options_.global_batch;
  LOOM_CHECK(s.num_tokens == source_->num_tokens())
      << "data loader state was saved for " << s.num_tokens << " tokens, this loader's data " << source_->describe()
      << " has " << source_->num_tokens();
  LOOM_CHECK(!options_.shuffle || s.seed == options_.seed)
      << "data loader state was saved for seed " << s.seed << ", this loader has " << options_.seed;
  LOOM_CHECK(s.epoch >= 0 && 0 <= s.step && s.step < steps_per_epoch_)
      << "data loader state (epoch " << s.epoch << ", step " << s.step << ") outside epochs >= 0, steps [0, "
      << steps_per_epoch_ << ")";
  epoch_ = s.epoch;
  step_ = s.step;
}

}  // namespace loom
