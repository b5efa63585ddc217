// Every recipe in launch/recipes trains a few steps with falling loss (a
// shortened run of the real recipe: its model, options and data source).
#include <gtest/gtest.h>

#include <filesystem>

#include "framework/config.h"
#include "framework/data.h"
#include "launch/trainer/trainer.h"
#include "parallel/mpi_communicator.h"
#include "tests/parallel/parallel_testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

TEST(Recipes, EveryRecipeTrainsAFewStepsWithFallingLoss) {
  MpiCommunicator& world = testing::mpi_context().world();
  bool have_corpus = true;
  try {
    find_demo_corpus();
  } catch (const Error&) {
    have_corpus = false;
  }
  if (!have_corpus) GTEST_SKIP() << "the Jargon File (Debian's jargon-text) is not installed";
  std::vector<fs::path> recipes;
  for (const auto& entry : fs::directory_iterator(fs::path(LOOM_SOURCE_DIR) / "launch" / "recipes"))
    if (entry.path().extension() == ".yaml") recipes.push_back(entry.path());
  std::sort(recipes.begin(), recipes.end());
  ASSERT_GE(recipes.size(), 7u);  // demo, recall-hybrid and one per architecture
  std::string log_dir = (fs::temp_directory_path() / ("loom_recipes_" + std::to_string(world.size()))).string();
  for (const fs::path& recipe : recipes) {
    SCOPED_TRACE(recipe.string());
    std::ostringstream sink;
    // Short and small: the recipe's architecture at a quick learning pace.
    std::vector<std::string> overrides = {"train.steps=8", "train.eval_every=0", "train.sample_every=0",
                                          "train.micro_batch_size=2", "data.seq_len=64",
                                          "optim.warmup_steps=1", "optim.schedule=constant",
                                          "checkpoint.every=0", "train.resume=none", "log.dir=" + log_dir};
    if (world.size() % load_config(recipe.string(), {}).parallel.cp != 0) {
      // The recipe's cp does not fit this rank count (hybrid-cp asks for 4): split the sequence over
      // all ranks where 64 tokens make two chunks per rank (zigzag), else run without cp.
      int cp = 64 % (2 * world.size()) == 0 ? world.size() : 1;
      overrides.push_back("parallel.cp=" + std::to_string(cp));
    }
    RunConfig config = load_config(recipe.string(), overrides);
    TrainSummary s = run_training(config, world, sink);
    ASSERT_EQ(s.losses.size(), 8u);
    double first = (s.losses[0] + s.losses[1]) / 2, last = (s.losses[6] + s.losses[7]) / 2;
    EXPECT_LT(last, first) << "losses " << ::testing::PrintToString(s.losses);
  }
  world.barrier();
  if (world.rank() == 0) fs::remove_all(log_dir);
}

}  // namespace
}  // namespace loom
