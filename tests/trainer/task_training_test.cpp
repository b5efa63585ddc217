// Training on synthetic tasks through run_training (ctest runs this binary at
// 1, 2 and 3 ranks): accuracy records in metrics.jsonl, the evaluator equals
// one rank under any dp split, resume continues the task stream exactly, and
// the logged step records carry the aux loss and the layer statistics.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "framework/config.h"
#include "framework/tasks.h"
#include "launch/trainer/task_eval.h"
#include "launch/trainer/trainer.h"
#include "models/decoder.h"
#include "parallel/mpi_communicator.h"
#include "tests/parallel/parallel_testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using testing::cpu_stream;
using testing::mpi_context;

// A directory every rank agrees on: rank 0 makes it, its name travels as numbers; removed (by
// rank 0, once every rank is done with it) at scope end.
class TaskTempDir {
 public:
  TaskTempDir(MpiCommunicator& world, const std::string& tag) : world_(world) {
    path_ = (fs::temp_directory_path() / ("loom_task_" + tag + "_XXXXXX")).string();
    Tensor code = Tensor::zeros({6}, DType::i64);
    if (world.rank() == 0) {
      LOOM_CHECK(mkdtemp(path_.data()) != nullptr) << "mkdtemp " << path_;
      for (int i = 0; i < 6; ++i) code.data<int64_t>()[i] = static_cast<unsigned char>(path_[path_.size() - 6 + i]);
    }
    world.broadcast(code, 0, cpu_stream());
    for (int i = 0; i < 6; ++i) path_[path_.size() - 6 + i] = static_cast<char>(code.data<int64_t>()[i]);
  }
  ~TaskTempDir() {
    world_.barrier();
    std::error_code ec;
    if (world_.rank() == 0) fs::remove_all(path_, ec);
  }
  TaskTempDir(const TaskTempDir&) = delete;
  TaskTempDir& operator=(const TaskTempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  MpiCommunicator& world_;
  std::string path_;
};

RunConfig tiny_task_run(const std::string& log_dir, const std::string& name, std::vector<std::string> extra = {}) {
  std::vector<std::string> overrides = {
      "data.task=recall", "data.recall.key_len=1", "data.recall.value_len=1", "data.seq_len=32",
      "train.eval_lengths=[\"32\", \"48\"]", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
      "model.max_seq_len=64", "train.steps=6", "train.micro_batch_size=2", "train.eval_every=3",
      "train.eval_batches=2", "train.log_every=1", "optim.warmup_steps=2", "optim.lr=1e-2",
      "optim.schedule=constant", "checkpoint.every=3", "checkpoint.keep_last=0", "log.dir=" + log_dir,
      "log.name=" + name, "train.resume=none"};
  overrides.insert(overrides.end(), extra.begin(), extra.end());
  return load_config_from_string("", "task.yaml", overrides);
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> records;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) records.push_back(nlohmann::json::parse(line));
  return records;
}

TEST(TaskTraining, RecallRunWritesAccuracyRecordsPerLength) {
  MpiCommunicator& world = mpi_context().world();
  const TaskTempDir temp(world, "recall");
  const std::string& dir = temp.path();
  std::ostringstream out;
  TrainSummary s = run_training(tiny_task_run(dir, "recall"), world, out);
  EXPECT_EQ(s.final_step, 6);
  ASSERT_EQ(s.task_evals.size(), 3u);  // steps 0, 3, 6
  EXPECT_GE(s.last_task_accuracy, 0.0);
  EXPECT_LE(s.last_task_accuracy, 1.0);
  for (double loss : s.losses) EXPECT_TRUE(std::isfinite(loss));
  for (double aux : s.aux_losses) EXPECT_EQ(aux, 0.0);  // dense model: no auxiliary losses
  if (world.rank() == 0) {
    EXPECT_NE(out.str().find("recall accuracy"), std::string::npos) << out.str();
    std::vector<nlohmann::json> records = read_metrics(dir + "/recall/metrics.jsonl");
    int evals = 0, steps = 0;
    for (const nlohmann::json& r : records) {
      if (r.contains("accuracy")) {
        ++evals;
        EXPECT_EQ(r["task"], "recall");
        ASSERT_TRUE(r["accuracy"].contains("32")) << r.dump();
        ASSERT_TRUE(r["accuracy"].contains("48")) << r.dump();
        EXPECT_GE(r["accuracy"]["48"].get<double>(), 0.0);
        EXPECT_FALSE(r.contains("val_loss"));
      } else if (r.contains("loss")) {
        ++steps;
        EXPECT_TRUE(r.contains("aux_loss")) << r.dump();
        EXPECT_TRUE(r["stats"].is_object()) << r.dump();
      }
    }
    EXPECT_EQ(evals, 3);
    EXPECT_EQ(steps, 6);
  }
  world.barrier();
}

// Statistics the routers leave on the device (MoE aux and z, MoH aux and
// loads) are read after each step and still reach metrics.jsonl.
TEST(TaskTraining, RouterStatisticsReachTheMetrics) {
  MpiCommunicator& world = mpi_context().world();
  const TaskTempDir temp(world, "routers");
  const std::string& dir = temp.path();
  std::ostringstream out;
  TrainSummary s = run_training(tiny_task_run(dir, "routers",
                                              {"model.ffn=moe", "model.moe.experts=4", "model.moe.topk=2",
                                               "model.S.heads=moh", "model.S.moh.shared=1", "model.S.moh.topk=2"}),
                                world, out);
  for (double aux : s.aux_losses) EXPECT_TRUE(std::isfinite(aux) && aux > 0.0) << aux;
  if (world.rank() == 0) {
    std::vector<nlohmann::json> records = read_metrics(dir + "/routers/metrics.jsonl");
    int steps = 0;
    for (const nlohmann::json& r : records) {
      if (!r.contains("loss")) continue;
      ++steps;
      for (const char* key : {"layer0.moe.aux", "layer1.moe.z", "layer1.moh.aux", "layer0.moh.head1.load"}) {
        ASSERT_TRUE(r["stats"].contains(key)) << key << " missing: " << r.dump();
        const double v = r["stats"][key].get<double>();
        EXPECT_TRUE(std::isfinite(v) && v > 0.0) << key << " = " << v;
      }
    }
    EXPECT_EQ(steps, 6);
  }
  world.barrier();
}

TEST(TaskTraining, ResumeContinuesTheTaskStream) {
  MpiCommunicator& world = mpi_context().world();
  const TaskTempDir temp(world, "resume");
  const std::string& dir = temp.path();
  std::ostringstream out;
  TrainSummary whole = run_training(tiny_task_run(dir, "whole"), world, out);
  // The same run stopped after 3 steps, then resumed to 6 (constant lr: train.steps does not shape the schedule).
  run_training(tiny_task_run(dir, "split", {"train.steps=3"}), world, out);
  TrainSummary rest = run_training(tiny_task_run(dir, "split", {"train.resume=auto"}), world, out);
  EXPECT_EQ(rest.start_step, 3);
  ASSERT_EQ(rest.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(rest.losses[i], whole.losses[i + 3]) << "step " << i + 4;
  EXPECT_EQ(rest.last_task_accuracy, whole.last_task_accuracy);
  // A checkpoint of a recall run does not resume a needle run.
  if (world.rank() == 0) std::ofstream(dir + "/filler.txt") << "some filler text for the needle. ";
  world.barrier();
  std::string e = testing::error_message([&] {
    run_training(tiny_task_run(dir, "split", {"train.resume=auto", "data.task=needle", "data.seq_len=80",
                                              "train.eval_lengths=[]", "model.max_seq_len=80",
                                              "data.text=" + dir + "/filler.txt"}),
                 world, out);
  });
  EXPECT_NE(e.find("data.task = recall, this run has data.task = needle"), std::string::npos) << e;
}

TEST(TaskTraining, EvaluatorUnderDpEqualsOneRank) {
  MpiCommunicator& world = mpi_context().world();
  const int p = world.size();
  RunConfig config = tiny_task_run("/tmp", "unused");
  DecoderLM model(decoder_config_from(config));
  model.initialize(5, 0.02, config.model.n_layers);
  TaskSpec spec;
  spec.kind = TaskKind::recall;
  spec.recall = config.data.recall;
  TaskDataset sharded(spec, 9, 2 * p, world.rank(), p);
  TaskEvalResult a = evaluate_task(model, sharded, {32, 48}, {}, 2, world);
  std::unique_ptr<MpiCommunicator> self = world.split(world.rank(), 0, "self");
  TaskDataset whole(spec, 9, 2 * p, 0, 1);
  TaskEvalResult b = evaluate_task(model, whole, {32, 48}, {}, 2, *self);
  // Counts and accuracies are exact; the lookup-free guess's expected score is a sum of fractions,
  // summed in another order over ranks: equal to rounding.
  nlohmann::json ja = a.to_json(), jb = b.to_json();
  for (const auto& [length, value] : jb.at("no_lookup_accuracy").items())
    EXPECT_NEAR(ja.at("no_lookup_accuracy").at(length).get<double>(), value.get<double>(), 1e-12) << length;
  ja.erase("no_lookup_accuracy");
  jb.erase("no_lookup_accuracy");
  EXPECT_EQ(ja, jb);
  EXPECT_EQ(a.by_length.at(48).total, 2 * 2 * p * 6);  // 48 tokens hold 6 pairs + 6 queries of 4 tokens
}

TEST(TaskTraining, NeedleRunReportsAccuracyPerDepth) {
  MpiCommunicator& world = mpi_context().world();
  const TaskTempDir temp(world, "needle");
  const std::string& dir = temp.path();
  if (world.rank() == 0) {
    std::ofstream text(dir + "/filler.txt");
    for (int i = 0; i < 400; ++i) text << "the hacker wrote a kernel for every machine and it ran. ";
  }
  world.barrier();
  std::ostringstream out;
  TrainSummary s = run_training(
      tiny_task_run(dir, "needle", {"data.task=needle", "data.text=" + dir + "/filler.txt", "data.seq_len=80",
                                    "train.eval_lengths=[]", "data.needle.depths=[\"0.0\", \"0.5\", \"1.0\"]",
                                    "train.steps=3", "model.max_seq_len=80"}),
      world, out);
  ASSERT_EQ(s.task_evals.size(), 2u);
  const nlohmann::json& last = s.task_evals.back();
  EXPECT_EQ(last["task"], "needle");
  EXPECT_TRUE(last["accuracy"].contains("80")) << last.dump();
  for (const char* d : {"0.0", "0.5", "1.0"}) EXPECT_TRUE(last["depth_accuracy"].contains(d)) << last.dump();
  if (world.rank() == 0) {
    EXPECT_NE(out.str().find("len\\depth"), std::string::npos) << out.str();
  }
}

}  // namespace
}  // namespace loom
