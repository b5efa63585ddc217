// The training loop behind loom-train: builds the mesh, data, model and
// optimizer from a RunConfig, trains train.steps optimizer steps with
// evaluation, sampling, logging, metrics and checkpoints, and resumes from the
// newest complete checkpoint when asked. Tests call it in-process.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "framework/config.h"

namespace loom {

class MpiCommunicator;

struct TrainSummary {
  int64_t start_step = 0;   // first step this run executed (> 0 after a resume)
  int64_t final_step = 0;   // steps completed in total
  std::vector<double> losses;  // training loss of every executed step (global mean)
  std::vector<double> grad_norms;  // global gradient norm before clipping (NaN for skipped steps)
  std::vector<double> aux_losses;  // auxiliary loss of every executed step (0 without MoE/MoH)
  double first_val_loss = -1;  // -1: no evaluation ran
  double last_val_loss = -1;
  double first_task_accuracy = -1;  // data.task != text: mean answer accuracy (-1: no evaluation ran)
  double last_task_accuracy = -1;
  std::vector<nlohmann::json> task_evals;  // every task evaluation, as written to metrics.jsonl (without "step")
  int64_t skipped_steps = 0;  // non-finite loss or gradients
  std::string last_checkpoint;
};

// Runs training on the ranks of `world` (every rank calls it). Rank 0 prints
// to `out`; errors throw loom::Error naming the value at fault.
TrainSummary run_training(const RunConfig& config, MpiCommunicator& world, std::ostream& out);

// The decoder's shapes from the recipe's model section (0-valued sizes resolved).
struct DecoderConfig;
DecoderConfig decoder_config_from(const RunConfig& config);

}  // namespace loom
