// loom-train [recipe.yaml] [section.key=value ...]
// Trains a model from a YAML recipe (the embedded demo recipe when none is
// given). Launch with `mpirun -np N build/loom-train ...`; N = 1 runs without
// mpirun too. `--help-config` lists every recipe key.
#include <cblas.h>
#include <omp.h>

#include <cstdlib>
#include <iostream>
#include <thread>
#include <string>
#include <vector>

#include "framework/config.h"
#include "launch/demo_recipe.h"
#include "launch/trainer/trainer.h"
#include "parallel/mpi_context.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  for (const std::string& a : args) {
    if (a == "-h" || a == "--help") {
      std::cout << "usage: loom-train [recipe.yaml] [section.key=value ...]\n"
                   "  Trains from a recipe (default: the embedded demo recipe, launch/recipes/demo.yaml).\n"
                   "  Launch on N ranks with: mpirun -np N build/loom-train ...\n"
                   "  --help-config   list every recipe key with its type, default and meaning\n";
      return 0;
    }
    if (a == "--help-config") {
      std::cout << loom::config_reference();
      return 0;
    }
  }
  try {
    loom::MpiContext mpi(&argc, &argv);
    // Share the node's cores among its ranks unless the user chose a thread count.
    if (std::getenv("OMP_NUM_THREADS") == nullptr) {
      int cores = static_cast<int>(std::thread::hardware_concurrency());
      omp_set_num_threads(std::max(1, cores / std::max(1, mpi.local_size())));
    }
    if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr) {
      int cores = static_cast<int>(std::thread::hardware_concurrency());
      openblas_set_num_threads(std::max(1, cores / std::max(1, mpi.local_size())));
    }
    try {
      std::string recipe;
      std::vector<std::string> overrides;
      for (const std::string& a : args) {
        if (a.find('=') == std::string::npos && recipe.empty()) recipe = a;
        else overrides.push_back(a);
      }
      loom::RunConfig config = recipe.empty()
                                   ? loom::load_config_from_string(loom::kDemoRecipe, "demo.yaml", overrides)
                                   : loom::load_config(recipe, overrides);
      loom::run_training(config, mpi.world(), std::cout);
    } catch (const std::exception& e) {
      if (mpi.world_size() > 1) loom::abort_all(std::string("loom-train: ") + e.what());
      std::cerr << "loom-train: " << e.what() << "\n";
      return 1;
    }
  } catch (const std::exception& e) {
    std::cerr << "loom-train: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
