// End-to-end training under mpirun (ctest runs this binary at 1, 2 and 3
// ranks): data parallelism equals one rank with the same global batch, resume
// is bit-identical, a killed-mid-write checkpoint is ignored, ZeRO-1 equals
// the replicated optimizer bitwise (and resumes either way), export
// round-trips through an independent reader, the demo recipe runs, and bad
// runs stop with clear errors.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "framework/checkpoint_io.h"
#include "framework/config.h"
#include "framework/data.h"
#include "framework/tokenizer.h"
#include "launch/demo_recipe.h"
#include "launch/trainer/export_model.h"
#include "launch/trainer/trainer.h"
#include "models/export.h"
#include "parallel/mpi_communicator.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using testing::cpu_stream;
using testing::mpi_context;

// A directory all ranks agree on (made by rank 0, name broadcast).
std::string shared_temp_dir(MpiCommunicator& world, const std::string& tag) {
  Tensor id = Tensor::scalar(0, DType::i64);
  if (world.rank() == 0) {
    std::string templ = (fs::temp_directory_path() / ("loom_train_" + tag + "_XXXXXX")).string();
    char* made = mkdtemp(templ.data());
    LOOM_CHECK(made != nullptr) << "mkdtemp " << templ;
    // The random suffix as a number the other ranks can rebuild the name from.
    std::string suffix = templ.substr(templ.size() - 6);
    int64_t code = 0;
    for (char c : suffix) code = code * 256 + static_cast<unsigned char>(c);
    id.fill_(static_cast<double>(code));
  }
  world.broadcast(id, 0, cpu_stream());
  int64_t code = static_cast<int64_t>(id.item());
  std::string suffix(6, ' ');
  for (int i = 5; i >= 0; --i, code /= 256) suffix[i] = static_cast<char>(code % 256);
  return (fs::temp_directory_path() / ("loom_train_" + tag + "_" + suffix)).string();
}

// Small English-like training text and its shards (rank 0 writes, all wait).
std::string prepare_shards(MpiCommunicator& world, const std::string& dir) {
  if (world.rank() == 0) {
    std::ofstream text(dir + "/text.txt");
    const char* words[] = {"the", "hacker", "wrote", "a", "kernel", "for", "every", "machine", "and", "it", "ran"};
    uint32_t x = 12345;
    for (int p = 0; p < 60; ++p) {
      for (int w = 0; w < 40; ++w) {
        x = x * 1664525u + 1013904223u;
        text << words[(x >> 16) % 11] << (w % 9 == 8 ? ". " : " ");
      }
      text << "\n\n";
    }
    text.close();
    prepare_text_corpus({dir + "/text.txt"}, dir + "/data", "small", 0.1, 100000, 2048);
  }
  world.barrier();
  return dir + "/data";
}

RunConfig tiny_run(const std::string& data_dir, const std::string& log_dir, const std::string& name,
                   std::vector<std::string> extra = {}) {
  std::vector<std::string> overrides = {
      "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
      "data.train=" + data_dir + "/small_train_*.bin", "data.val=" + data_dir + "/small_val_*.bin",
      "data.seq_len=16", "train.steps=6", "train.micro_batch_size=2", "train.eval_every=3", "train.eval_batches=2",
      "train.log_every=1", "train.sample_every=0", "optim.warmup_steps=2", "optim.lr=1e-2", "checkpoint.every=3",
      "checkpoint.keep_last=0", "log.dir=" + log_dir, "log.name=" + name, "train.resume=none"};
  overrides.insert(overrides.end(), extra.begin(), extra.end());
  return load_config_from_string("", "test.yaml", overrides);
}

std::map<std::string, Tensor> checkpoint_state(const std::string& dir) {
  return read_tensors_h5(dir + "/" + checkpoint_rank_file(0));
}

TEST(Training, DataParallelEqualsOneRankWithTheSameGlobalBatch) {
  MpiCommunicator& world = mpi_context().world();
  const int p = world.size();
  std::string dir = shared_temp_dir(world, "dp");
  std::string data = prepare_shards(world, dir);
  std::ostringstream sink;

  // Summation order differs between the runs (f32 gradients averaged over
  // ranks vs. summed in one batch); Adam divides by sqrt(v) + eps, which turns
  // rounding noise in near-zero gradients into full-size updates. An eps near
  // the gradients' scale keeps such elements' updates near zero, so parameters
  // agree to f32 accuracy instead of to the learning rate.
  const std::string eps = "optim.eps=1e-4";
  // P ranks, 2 sequences each.
  TrainSummary dp = run_training(tiny_run(data, dir, "dp", {eps}), world, sink);
  // One rank alone (every rank, on its own communicator): 2P sequences in one
  // micro-batch, and 2 sequences x P accumulated micro-batches.
  std::unique_ptr<MpiCommunicator> self = world.split(world.rank(), 0, "self");
  std::string r = std::to_string(world.rank());
  TrainSummary big = run_training(
      tiny_run(data, dir, "one_big_" + r, {eps, "train.micro_batch_size=" + std::to_string(2 * p)}), *self, sink);
  TrainSummary accum = run_training(
      tiny_run(data, dir, "one_accum_" + r, {eps, "train.grad_accum=" + std::to_string(p)}), *self, sink);

  ASSERT_EQ(dp.losses.size(), 6u);
  for (size_t i = 0; i < dp.losses.size(); ++i) {
    EXPECT_NEAR(dp.losses[i], big.losses[i], 1e-5 * std::fabs(big.losses[i])) << "step " << i + 1;
    EXPECT_NEAR(dp.losses[i], accum.losses[i], 1e-5 * std::fabs(accum.losses[i])) << "step " << i + 1;
    // Adam is nearly blind to a uniform gradient scale, so the norms pin the averaging down.
    EXPECT_NEAR(dp.grad_norms[i], big.grad_norms[i], 1e-5 * big.grad_norms[i]) << "step " << i + 1;
    EXPECT_NEAR(dp.grad_norms[i], accum.grad_norms[i], 1e-5 * accum.grad_norms[i]) << "step " << i + 1;
  }
  EXPECT_LT(dp.losses.back(), dp.losses.front());
  auto dp_state = checkpoint_state(dp.last_checkpoint), big_state = checkpoint_state(big.last_checkpoint),
       accum_state = checkpoint_state(accum.last_checkpoint);
  for (const auto& [name, t] : dp_state) {
    if (name.rfind("model/", 0) != 0) continue;
    EXPECT_TENSOR_CLOSE(t, big_state.at(name), 1e-4, 1e-6) << name;
    EXPECT_TENSOR_CLOSE(t, accum_state.at(name), 1e-4, 1e-6) << name;
  }
  world.barrier();
  if (world.rank() == 0) fs::remove_all(dir);
}

TEST(Training, ResumeIsBitIdenticalAndSkipsIncompleteCheckpoints) {
  MpiCommunicator& world = mpi_context().world();
  std::string dir = shared_temp_dir(world, "resume");
  std::string data = prepare_shards(world, dir);
  std::ostringstream sink;
  RunConfig config = tiny_run(data, dir, "run");
  TrainSummary full = run_training(config, world, sink);
  ASSERT_EQ(full.losses.size(), 6u);
  auto final_state = checkpoint_state(full.last_checkpoint);

  // "Interrupt" after step 3: drop the later checkpoint, and leave what a
  // killed writer leaves: a .tmp directory and a step directory with no index.
  fs::path ckpt = config.checkpoint_dir();
  world.barrier();
  if (world.rank() == 0) {
    fs::remove_all(checkpoint_dir(ckpt, 6));
    fs::create_directories(checkpoint_tmp_dir(ckpt, 5));
    std::ofstream(checkpoint_tmp_dir(ckpt, 5) / checkpoint_rank_file(0)) << "partial";
    fs::create_directories(checkpoint_dir(ckpt, 4));
    std::ofstream(checkpoint_dir(ckpt, 4) / checkpoint_rank_file(0)) << "partial";
  }
  world.barrier();
  config.train.resume = "auto";
  TrainSummary resumed = run_training(config, world, sink);
  EXPECT_EQ(resumed.start_step, 3);
  ASSERT_EQ(resumed.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed.losses[i], full.losses[3 + i]) << "step " << 4 + i;
  auto resumed_state = checkpoint_state(resumed.last_checkpoint);
  for (const auto& [name, t] : final_state) EXPECT_TENSOR_CLOSE(resumed_state.at(name), t, 0, 0) << name;

  // A different dp size: rank 0 alone continues the same run from step 3 with
  // the same global batch (replicated parameters, optimizer state re-laid).
  if (world.size() > 1) {
    std::unique_ptr<MpiCommunicator> self = world.split(world.rank() == 0 ? 0 : 1, 0, "self");
    if (world.rank() == 0) {
      fs::copy(config.run_dir(), dir + "/run1", fs::copy_options::recursive);
      fs::remove_all(checkpoint_dir(dir + "/run1/checkpoints", 6));
      RunConfig one = tiny_run(data, dir, "run1",
                               {"train.resume=auto", "train.micro_batch_size=" + std::to_string(2 * world.size())});
      TrainSummary alone = run_training(one, *self, sink);
      EXPECT_EQ(alone.start_step, 3);
      for (size_t i = 0; i < 3; ++i)
        EXPECT_NEAR(alone.losses[i], full.losses[3 + i], 1e-5 * std::fabs(full.losses[3 + i]));
    }
  }
  world.barrier();
  if (world.rank() == 0) fs::remove_all(dir);
}

// ZeRO-1 (optim.zero = true) is the replicated optimizer with its state
// sharded over dp: the same losses, grad norms and parameters bitwise, the same
// (gathered) checkpoint state, a resume from its own checkpoint is
// bit-identical, and the checkpoint resumes an unsharded run too (its format
// does not depend on sharding).
TEST(Training, ZeroOneEqualsTheReplicatedOptimizerBitwise) {
  MpiCommunicator& world = mpi_context().world();
  std::string dir = shared_temp_dir(world, "zero");
  std::string data = prepare_shards(world, dir);
  std::ostringstream sink;
  TrainSummary plain = run_training(tiny_run(data, dir, "plain"), world, sink);
  RunConfig zero_config = tiny_run(data, dir, "zero", {"optim.zero=true"});
  TrainSummary zero = run_training(zero_config, world, sink);
  if (world.rank() == 0 && world.size() > 1) {
    EXPECT_NE(sink.str().find("ZeRO-1 over " + std::to_string(world.size()) + " dp ranks"), std::string::npos);
  }
  ASSERT_EQ(zero.losses.size(), plain.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i) {
    EXPECT_EQ(zero.losses[i], plain.losses[i]) << "step " << i + 1;
    EXPECT_EQ(zero.grad_norms[i], plain.grad_norms[i]) << "step " << i + 1;
  }
  auto plain_state = checkpoint_state(plain.last_checkpoint), zero_state = checkpoint_state(zero.last_checkpoint);
  ASSERT_EQ(zero_state.size(), plain_state.size());
  for (const auto& [name, t] : plain_state) EXPECT_TENSOR_CLOSE(zero_state.at(name), t, 0, 0) << name;

  // Resume the sharded run at step 3, sharded: bit-identical; and unsharded: the same.
  world.barrier();
  if (world.rank() == 0) {
    fs::copy(zero_config.run_dir(), dir + "/zero_plain", fs::copy_options::recursive);
    fs::remove_all(checkpoint_dir(zero_config.checkpoint_dir(), 6));
    fs::remove_all(checkpoint_dir(dir + "/zero_plain/checkpoints", 6));
  }
  world.barrier();
  zero_config.train.resume = "auto";
  TrainSummary resumed = run_training(zero_config, world, sink);
  TrainSummary unsharded = run_training(tiny_run(data, dir, "zero_plain", {"train.resume=auto"}), world, sink);
  EXPECT_EQ(resumed.start_step, 3);
  EXPECT_EQ(unsharded.start_step, 3);
  ASSERT_EQ(resumed.losses.size(), 3u);
  ASSERT_EQ(unsharded.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(resumed.losses[i], plain.losses[3 + i]) << "step " << 4 + i;
    EXPECT_EQ(unsharded.losses[i], plain.losses[3 + i]) << "step " << 4 + i;
  }
  auto resumed_state = checkpoint_state(resumed.last_checkpoint);
  for (const auto& [name, t] : plain_state) EXPECT_TENSOR_CLOSE(resumed_state.at(name), t, 0, 0) << name;
  world.barrier();
  if (world.rank() == 0) fs::remove_all(dir);
}

TEST(Training, ExportRoundTripsThroughAnIndependentReader) {
  MpiCommunicator& world = mpi_context().world();
  std::string dir = shared_temp_dir(world, "export");
  std::string data = prepare_shards(world, dir);
  std::ostringstream sink;
  TrainSummary run = run_training(tiny_run(data, dir, "run", {"train.steps=2"}), world, sink);
  if (world.rank() == 0) {
    ExportResult r = export_checkpoint(run.last_checkpoint, dir + "/export", DType::f32);
    EXPECT_EQ(r.step, 2);
    // Independent minimal reader: 8-byte little-endian length, JSON header, raw data.
    std::ifstream in(r.safetensors_path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_GE(bytes.size(), 8u);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
    EXPECT_EQ(n % 8, 0u);
    nlohmann::json header = nlohmann::json::parse(bytes.substr(8, n));
    const char* data_section = bytes.data() + 8 + n;
    auto state = checkpoint_state(run.last_checkpoint);
    int64_t checked = 0;
    for (const auto& [key, t] : state) {
      if (key.rfind("model/", 0) != 0) continue;
      std::string name = export_name(key.substr(6));
      ASSERT_TRUE(header.contains(name)) << name;
      const auto& entry = header[name];
      EXPECT_EQ(entry["dtype"], "F32");
      EXPECT_EQ(entry["shape"].get<std::vector<int64_t>>(), t.shape()) << name;
      auto offsets = entry["data_offsets"].get<std::vector<size_t>>();
      std::vector<float> expected = t.to_vector<float>();
      ASSERT_EQ(offsets[1] - offsets[0], expected.size() * 4) << name;
      EXPECT_EQ(std::memcmp(data_section + offsets[0], expected.data(), offsets[1] - offsets[0]), 0) << name;
      ++checked;
    }
    EXPECT_EQ(checked + 1, static_cast<int64_t>(header.size()));  // + __metadata__
    EXPECT_TRUE(header.contains("model.layers.1.self_attn.q_proj.weight"));
    std::ifstream cfg(r.config_path);
    nlohmann::json config = nlohmann::json::parse(cfg);
    EXPECT_EQ(config["architectures"][0], "LlamaForCausalLM");
    EXPECT_EQ(config["hidden_size"], 32);
    EXPECT_EQ(config["num_key_value_heads"], 2);
    EXPECT_EQ(config["tie_word_embeddings"], true);
    // bf16 export: every value is the f32 value rounded to nearest even.
    ExportResult rb = export_checkpoint(run.last_checkpoint, dir + "/export_bf16", DType::bf16);
    EXPECT_GT(fs::file_size(r.safetensors_path), fs::file_size(rb.safetensors_path));
  }
  world.barrier();
  if (world.rank() == 0) fs::remove_all(dir);
}

TEST(Training, TheEmbeddedDemoRecipeRunsAFewSteps) {
  MpiCommunicator& world = mpi_context().world();
  std::string dir = shared_temp_dir(world, "demo");
  std::string corpus;
  if (world.rank() == 0) {
    try {
      corpus = find_demo_corpus();
    } catch (const Error&) {
    }
  }
  Tensor have = Tensor::scalar(corpus.empty() ? 0 : 1, DType::i64);
  world.broadcast(have, 0, cpu_stream());
  if (have.item() == 0) GTEST_SKIP() << "the Jargon File (Debian's jargon-text) is not installed";
  std::ostringstream out;
  RunConfig config = load_config_from_string(
      kDemoRecipe, "demo.yaml",
      {"train.steps=3", "train.eval_every=2", "train.eval_batches=1", "train.sample_tokens=8", "train.log_every=1",
       "checkpoint.every=0", "log.dir=" + dir});
  EXPECT_EQ(config.log.name, "demo");
  TrainSummary s = run_training(config, world, out);
  EXPECT_EQ(s.final_step, 3);
  EXPECT_GT(s.first_val_loss, 0);
  for (double l : s.losses) EXPECT_TRUE(std::isfinite(l));
  if (world.rank() == 0) {
    EXPECT_TRUE(fs::exists(dir + "/demo/config.yaml"));
    EXPECT_TRUE(fs::exists(dir + "/demo/checkpoints/step_00000003/index.json"));
    std::ifstream metrics(dir + "/demo/metrics.jsonl");
    int lines = 0;
    for (std::string line; std::getline(metrics, line);) {
      nlohmann::json record = nlohmann::json::parse(line);
      EXPECT_TRUE(record.contains("step"));
      ++lines;
    }
    EXPECT_GE(lines, 4);  // 3 steps + evaluations
    std::string log = out.str();
    EXPECT_NE(log.find("step 3/3 | loss"), std::string::npos) << log;
    EXPECT_NE(log.find("tok/s"), std::string::npos);
    EXPECT_NE(log.find("ETA"), std::string::npos);
    EXPECT_NE(log.find("sample: The hacker"), std::string::npos);
  }
  world.barrier();
  if (world.rank() == 0) fs::remove_all(dir);
}

TEST(Training, RepeatedNonFiniteStepsStopWithAClearError) {
  MpiCommunicator& world = mpi_context().world();
  std::string dir = shared_temp_dir(world, "nan");
  std::string data = prepare_shards(world, dir);
  std::ostringstream sink;
  // A learning rate this large drives the weights to inf after one step.
  RunConfig config = tiny_run(data, dir, "nan",
                              {"optim.lr=1e30", "optim.min_lr=0", "optim.warmup_steps=0", "optim.grad_clip=0",
                               "train.max_bad_steps=2", "train.eval_every=0"});
  std::string message = testing::error_message([&] { run_training(config, world, sink); });
  EXPECT_NE(message.find("train.max_bad_steps = 2"), std::string::npos) << message;
  world.barrier();
  if (world.rank() == 0) fs::remove_all(dir);
}

TEST(Training, UnavailableFeaturesAreRefusedByName) {
  MpiCommunicator& world = mpi_context().world();
  std::ostringstream sink;
  RunConfig config = load_config_from_string("", "x.yaml", {"parallel.ep=2", "log.dir=/tmp/loom_unused"});
  EXPECT_NE(testing::error_message([&] { run_training(config, world, sink); }).find("parallel.ep = 2"),
            std::string::npos);
  // CUDA trains where a GPU is usable (tests/cuda/training_test.cpp); elsewhere the setting is refused by name.
  if (!cuda_is_available()) {
    config = load_config_from_string("", "x.yaml", {"train.device=cuda", "log.dir=/tmp/loom_unused"});
    EXPECT_NE(testing::error_message([&] { run_training(config, world, sink); }).find("train.device = \"cuda\""),
              std::string::npos);
  }
}

}  // namespace
}  // namespace loom
