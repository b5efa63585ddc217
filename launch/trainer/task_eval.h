// Task accuracy of a model on the synthetic long-context tasks (framework/tasks.h):
// greedy exact match of the answer tokens per evaluation length and (needle) per
// depth, on fixed evaluation streams, with counts summed over the dp ranks.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "framework/config.h"
#include "framework/tasks.h"

namespace loom {

class Communicator;
class DecoderLM;

struct TaskEvalResult {
  std::string task;
  std::map<int64_t, AnswerCounts> by_length;                       // all depths together
  std::map<std::string, AnswerCounts> by_depth;                    // needle: all lengths together
  std::map<int64_t, std::map<std::string, AnswerCounts>> by_cell;  // needle: length x depth
  std::map<int64_t, RecallBreakdown> recall_by_length;              // recall: by query and by pair, per length

  // {"task", "accuracy": {"<len>": acc}, "depth_accuracy": {"<depth>": acc},
  //  "length_depth_accuracy": {"<len>": {"<depth>": acc}}} (depth keys only for needle),
  //  recall: "query_accuracy", "pair_accuracy": {"<len>": [acc of query / pair 0, 1, ...]},
  //  "no_lookup_accuracy": {"<len>": acc of the lookup-free guess (RecallBreakdown)}.
  nlohmann::json to_json() const;
  std::string table() const;  // a small aligned table for the log
  double mean_accuracy() const;  // over every answer token evaluated
};

// The evaluation lengths: train.eval_lengths, or data.seq_len when empty.
std::vector<int64_t> task_eval_lengths(const RunConfig& config);

// `batches` global batches of `dataset.global_batch()` rows per (length, depth);
// every rank of `dp` calls it and gets the same result.
TaskEvalResult evaluate_task(const DecoderLM& model, const TaskDataset& dataset, const std::vector<int64_t>& lengths,
                             const std::vector<std::string>& depths, int64_t batches, Communicator& dp);

}  // namespace loom
