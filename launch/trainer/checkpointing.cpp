// Checkpoint save/load for the trainer (see checkpointing.h).
#include "launch/trainer/checkpointing.h"

#include <filesystem>

#include "framework/checkpoint_io.h"
#include "optim/adamw.h"
#include "parallel/mpi_communicator.h"

namespace loom {

namespace {
constexpr const char* kModelPrefix = "model/";
constexpr const char* kOptimPrefix = "optim/";

// Broadcasts a string from rank 0 (lengths first, then bytes).
std::string broadcast_string(const std::string& value, MpiCommunicator& world) {
  Stream& s = Stream::default_for(Device::cpu());
  Tensor length = Tensor::scalar(static_cast<double>(value.size()), DType::i64);
  world.broadcast(length, 0, s);
  int64_t n = static_cast<int64_t>(length.item());
  Tensor bytes = Tensor::zeros({n}, DType::u8);
  if (world.rank() == 0) std::copy(value.begin(), value.end(), bytes.data<uint8_t>());
  world.broadcast(bytes, 0, s);
  return std::string(reinterpret_cast<const char*>(bytes.data<uint8_t>()), static_cast<size_t>(n));
}
}  // namespace

std::string save_checkpoint(const RunConfig& config, const Module& model, const AdamW& optimizer,
                            const TrainingCounters& counters, MpiCommunicator& world) {
  std::filesystem::path root = config.checkpoint_dir();
  if (world.rank() == 0) begin_checkpoint(root, counters.step);
  world.barrier();
  std::filesystem::path tmp = checkpoint_tmp_dir(root, counters.step);
  // Replicated state: world rank 0 holds the dp-coordinate-0 copy (cp = ep = 1 here).
  // (A sharded optimizer gathers its state: every rank calls state_dict.)
  std::map<std::string, Tensor> tensors;
  StateDict optim_state = optimizer.state_dict();
  if (world.rank() == 0) {
    for (const auto& [name, t] : model.state_dict()) tensors[kModelPrefix + name] = t;
    for (const auto& [name, t] : optim_state) tensors[kOptimPrefix + name] = t;
  }
  nlohmann::json rank_meta = {{"rank", world.rank()}, {"world_size", world.size()},
                              {"holds_state", world.rank() == 0}};
  write_tensors_h5((tmp / checkpoint_rank_file(world.rank())).string(), tensors, rank_meta);
  world.barrier();
  std::filesystem::path final_dir = checkpoint_dir(root, counters.step);
  if (world.rank() == 0) {
    nlohmann::json index;
    index["step"] = counters.step;
    index["format"] = "loom-checkpoint-1";
    std::vector<std::string> files;
    for (int r = 0; r < world.size(); ++r) files.push_back(checkpoint_rank_file(r));
    index["rank_files"] = files;
    index["state_file"] = checkpoint_rank_file(0);
    index["world"] = {{"size", world.size()}, {"dp", config.parallel.dp}, {"cp", config.parallel.cp},
                      {"ep", config.parallel.ep}};
    index["tokens"] = counters.tokens;
    index["skipped_steps"] = counters.skipped_steps;
    index["bad_steps_in_a_row"] = counters.bad_steps_in_a_row;
    index["data"] = counters.loader_state;
    // Training has no random draws besides the data order (in "data") and sampling,
    // which is seeded from (train.seed, step); recorded for completeness.
    index["rng"] = {{"seed", config.train.seed}, {"sampling", "philox(seed + step)"}};
    index["config"] = to_yaml(config);
    write_checkpoint_index(tmp, index);
    commit_checkpoint(tmp, final_dir);
    prune_checkpoints(root, config.checkpoint.keep_last);
  }
  world.barrier();
  return final_dir.string();
}

std::optional<std::string> resume_checkpoint(const RunConfig& config, MpiCommunicator& world) {
  std::string chosen;
  if (world.rank() == 0) {
    const std::string& mode = config.train.resume;
    if (mode == "auto") {
      auto latest = find_latest_checkpoint(config.checkpoint_dir());
      if (latest) chosen = latest->string();
    } else if (mode != "none") {
      LOOM_CHECK(std::filesystem::is_directory(mode)) << "train.resume = \"" << mode
                                                     << "\": not a checkpoint directory (use auto, none or a path)";
      read_checkpoint_index(mode);  // validates before every rank commits to it
      chosen = mode;
    }
  }
  chosen = broadcast_string(chosen, world);
  if (chosen.empty()) return std::nullopt;
  return chosen;
}

TrainingCounters load_checkpoint(const std::string& dir, Module& model, AdamW& optimizer) {
  nlohmann::json index = read_checkpoint_index(dir);
  LOOM_CHECK(index.value("format", "") == "loom-checkpoint-1")
      << "checkpoint " << dir << ": unknown format '" << index.value("format", "") << "'";
  std::string state_file = (std::filesystem::path(dir) / index.at("state_file").get<std::string>()).string();
  std::map<std::string, Tensor> tensors = read_tensors_h5(state_file);
  StateDict model_state, optim_state;
  for (auto& [key, t] : tensors) {
    if (key.rfind(kModelPrefix, 0) == 0) model_state[key.substr(std::string(kModelPrefix).size())] = t;
    else if (key.rfind(kOptimPrefix, 0) == 0) optim_state[key.substr(std::string(kOptimPrefix).size())] = t;
    else LOOM_FAIL() << "checkpoint " << state_file << ": unexpected entry '" << key << "'";
  }
  model.load_state_dict(model_state);
  optimizer.load_state_dict(optim_state);
  TrainingCounters c;
  c.step = index.at("step").get<int64_t>();
  c.tokens = index.value("tokens", int64_t{0});
  c.skipped_steps = index.value("skipped_steps", int64_t{0});
  c.bad_steps_in_a_row = index.value("bad_steps_in_a_row", int64_t{0});
  c.loader_state = index.at("data");
  return c;
}

}  // namespace loom
