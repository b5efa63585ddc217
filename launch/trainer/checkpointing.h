// Saving and restoring training state: model parameters, optimizer state
// (moments, masters, step count), data-loader position and counters, written
// with the atomic checkpoint-directory protocol of framework/checkpoint_io.h.
//
// Under data parallelism every rank holds the same replicated state, so the
// rank with dp coordinate 0 writes it and the other ranks write a file with
// their metadata only; index.json records the world layout and which file
// holds the state. Loading reads that file on every rank, so a run can resume
// with a different dp size (replicated parameters; optimizer state re-laid).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "framework/config.h"
#include "framework/module.h"

namespace loom {

class AdamW;
class MpiCommunicator;

struct TrainingCounters {
  int64_t step = 0;               // optimizer steps completed
  int64_t tokens = 0;             // tokens trained on
  int64_t skipped_steps = 0;      // total non-finite steps
  int64_t bad_steps_in_a_row = 0;
  nlohmann::json loader_state;    // DataLoaderState::to_json()
};

// Collective over `world`. Returns the committed directory.
std::string save_checkpoint(const RunConfig& config, const Module& model, const AdamW& optimizer,
                            const TrainingCounters& counters, MpiCommunicator& world);

// The checkpoint to resume from for train.resume (auto | none | a path), agreed
// by all ranks (rank 0 decides and broadcasts); nullopt for a fresh start.
std::optional<std::string> resume_checkpoint(const RunConfig& config, MpiCommunicator& world);

// Loads model and optimizer state from `dir` into `model`/`optimizer` and
// returns the counters. Errors name the directory and what is wrong.
TrainingCounters load_checkpoint(const std::string& dir, Module& model, AdamW& optimizer);

}  // namespace loom
