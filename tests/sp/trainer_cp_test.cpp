// loom-train's loop under sequence parallelism: a few steps of a hybrid model
// at cp = 2 (and dp 1) give the same losses and gradient norms as cp = 1,
// ZeRO-1 at dp 2 x cp 2 equals the replicated optimizer bitwise, the
// metrics carry the step's bytes per layer type, and a sequence length the
// layout cannot split is rejected with the numbers.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "framework/config.h"
#include "launch/trainer/trainer.h"
#include "tests/sp/sp_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

// A fresh directory name all ranks of `group` agree on (rank 0's pid and a tag).
std::string shared_dir(Communicator& group, const std::string& tag) {
  Tensor pid = Tensor::scalar(static_cast<double>(getpid()), DType::i64);
  group.broadcast(pid, 0, testing::cpu_stream());
  return (fs::temp_directory_path() / ("loom_sp_" + tag + "_" + std::to_string(pid.data<int64_t>()[0]))).string();
}

RunConfig cp_run(const std::string& dir, const std::string& name, std::vector<std::string> extra) {
  std::vector<std::string> overrides = {
      "model.d_model=16", "model.n_layers=4", "model.n_heads=2", "model.n_kv_heads=1", "model.layers=LLLS",
      "model.max_seq_len=64", "model.L.block=8", "data.task=recall", "data.seq_len=32", "train.steps=4",
      "train.micro_batch_size=2", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "train.sample_every=0",
      "optim.warmup_steps=1", "optim.lr=1e-2", "optim.eps=1e-4", "checkpoint.every=0", "checkpoint.keep_last=1",
      "log.dir=" + dir, "log.name=" + name, "log.progress=off", "train.resume=none"};
  overrides.insert(overrides.end(), extra.begin(), extra.end());
  return load_config_from_string("", "sp_test.yaml", overrides);
}

TEST(CpTraining, TwoRanksEqualOneRank) {
  LOOM_SP_GROUP(pair, 2);
  const std::string dir = shared_dir(*pair, "train");
  std::ostringstream sink;
  for (const std::string layout : {"zigzag", "contiguous"}) {
    for (const std::string softmax : {"ring", "allgather"}) {
      const std::string name = "cp2_" + layout + "_" + softmax;
      TrainSummary cp = run_training(
          cp_run(dir, name, {"parallel.cp=2", "parallel.layout=" + layout, "parallel.cp_softmax=" + softmax}), *pair,
          sink);
      std::unique_ptr<MpiCommunicator> self = pair->split(pair->rank(), 0, "self");
      TrainSummary one =
          run_training(cp_run(dir, "one_" + name + "_" + std::to_string(pair->rank()), {}), *self, sink);
      ASSERT_EQ(cp.losses.size(), 4u);
      for (size_t i = 0; i < cp.losses.size(); ++i) {
        EXPECT_NEAR(cp.losses[i], one.losses[i], 1e-5 * std::fabs(one.losses[i])) << name << " step " << i + 1;
        EXPECT_NEAR(cp.grad_norms[i], one.grad_norms[i], 1e-4 * one.grad_norms[i]) << name << " step " << i + 1;
      }
      if (pair->rank() == 0) {  // the step's bytes per layer type, in metrics.jsonl
        std::ifstream metrics(dir + "/" + name + "/metrics.jsonl");
        std::string line, last;
        while (std::getline(metrics, line))
          if (line.find("\"comm_bytes\"") != std::string::npos) last = line;
        ASSERT_FALSE(last.empty()) << "no step record with comm_bytes";
        nlohmann::json bytes = nlohmann::json::parse(last).at("comm_bytes");
        // LASP-2: 3 L layers x 2 all-gathers of (U, B=2, H=2, D=8, D=8) f32 states, U = 2 under zigzag.
        const double units = layout == "zigzag" ? 2 : 1;
        EXPECT_DOUBLE_EQ(bytes.at("L").get<double>(), 3 * 2 * units * 2 * 2 * 8 * 8 * 4) << bytes.dump();
        EXPECT_GT(bytes.at("S").get<double>(), 0) << bytes.dump();
        EXPECT_GT(bytes.at("loss").get<double>(), 0) << bytes.dump();
      }
    }
  }
  pair->barrier();
  if (pair->rank() == 0) fs::remove_all(dir);
}

// ZeRO-1 under dp 2 x cp 2: the optimizer state sharded over each dp group
// (replicated over cp) gives bitwise the losses and gradient norms of the
// replicated optimizer.
TEST(CpTraining, ZeroOneUnderDataTimesContextParallelEqualsReplicated) {
  LOOM_SP_GROUP(quad, 4);
  const std::string dir = shared_dir(*quad, "zero");
  std::ostringstream sink;
  TrainSummary plain = run_training(cp_run(dir, "dp2cp2", {"parallel.cp=2"}), *quad, sink);
  TrainSummary zero = run_training(cp_run(dir, "dp2cp2_zero", {"parallel.cp=2", "optim.zero=true"}), *quad, sink);
  if (quad->rank() == 0) {
    EXPECT_NE(sink.str().find("ZeRO-1 over 2 dp ranks"), std::string::npos) << sink.str();
  }
  ASSERT_EQ(zero.losses.size(), 4u);
  for (size_t i = 0; i < zero.losses.size(); ++i) {
    EXPECT_EQ(zero.losses[i], plain.losses[i]) << "step " << i + 1;
    EXPECT_EQ(zero.grad_norms[i], plain.grad_norms[i]) << "step " << i + 1;
  }
  quad->barrier();
  if (quad->rank() == 0) fs::remove_all(dir);
}

TEST(CpTraining, SequenceLengthTheLayoutCannotSplitIsAnError) {
  LOOM_SP_GROUP(pair, 2);
  const std::string dir = shared_dir(*pair, "bad");
  std::ostringstream sink;
  std::string msg = testing::error_message(
      [&] { run_training(cp_run(dir, "bad", {"parallel.cp=2", "data.seq_len=30"}), *pair, sink); });
  EXPECT_NE(msg.find("seq_len 30 is not a multiple of 4"), std::string::npos) << msg;
  msg = testing::error_message([&] {
    run_training(cp_run(dir, "bad2", {"parallel.cp=2", "parallel.cp_softmax=striped"}), *pair, sink);
  });
  EXPECT_NE(msg.find("striped"), std::string::npos) << msg;
  pair->barrier();
  if (pair->rank() == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace loom
