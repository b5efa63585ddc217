// Task evaluation (see task_eval.h). Evaluation examples come from streams of
// their own (task_eval_stream), so the set is the same at every evaluation,
// for every dp layout, and never overlaps the training stream.
#include "launch/trainer/task_eval.h"

#include <fmt/format.h>

#include "framework/autograd.h"
#include "models/decoder.h"
#include "parallel/communicator.h"

namespace loom {

namespace {

void add(AnswerCounts& into, const AnswerCounts& c) {
  into.correct += c.correct;
  into.total += c.total;
}

}  // namespace

std::vector<int64_t> task_eval_lengths(const RunConfig& config) {
  std::vector<int64_t> lengths;
  for (const std::string& l : config.train.eval_lengths) lengths.push_back(std::stoll(l));
  if (lengths.empty()) lengths.push_back(config.data.seq_len);
  return lengths;
}

TaskEvalResult evaluate_task(const DecoderLM& model, const TaskDataset& dataset, const std::vector<int64_t>& lengths,
                             const std::vector<std::string>& depths, int64_t batches, Communicator& dp) {
  NoGradGuard no_grad;
  const bool needle = dataset.spec().kind == TaskKind::needle;
  std::vector<double> depth_values = needle ? needle_depths(depths) : std::vector<double>{-1.0};
  TaskEvalResult result;
  result.task = task_kind_name(dataset.spec().kind);
  // Local counts, in (length, depth) order: [correct, total] pairs, summed over dp in one all-reduce.
  // Recall then adds its per-query and per-pair counts of each length.
  std::vector<double> counts;
  std::map<int64_t, RecallBreakdown> breakdowns;
  for (int64_t length : lengths) {
    RecallLayout layout;
    if (!needle) layout = recall_layout(dataset.spec().recall, length, nullptr);
    for (size_t d = 0; d < depth_values.size(); ++d) {
      AnswerCounts cell;
      uint64_t stream = task_eval_stream(length, static_cast<int64_t>(d));
      for (int64_t b = 0; b < batches; ++b) {
        Batch batch = dataset.batch(b * dataset.global_batch(), length, stream, depth_values[d]);
        SequenceContext ctx;
        Variable logits = model.forward(batch.inputs, ctx);  // (B, T, V)
        add(cell, answer_accuracy(logits.data(), batch.targets));
        if (!needle) add_recall_breakdown(breakdowns[length], logits.data(), batch.inputs, batch.targets, layout);
      }
      counts.push_back(static_cast<double>(cell.correct));
      counts.push_back(static_cast<double>(cell.total));
    }
  }
  for (const auto& [length, breakdown] : breakdowns) {
    counts.push_back(breakdown.no_lookup);
    for (const auto* list : {&breakdown.by_query, &breakdown.by_pair})
      for (const AnswerCounts& c : *list) {
        counts.push_back(static_cast<double>(c.correct));
        counts.push_back(static_cast<double>(c.total));
      }
  }
  Tensor summed = Tensor::from_vector(counts, {static_cast<int64_t>(counts.size())});
  dp.all_reduce(summed, ReduceOp::sum, Stream::default_for(Device::cpu()));
  std::vector<double> global = summed.to_vector<double>();
  size_t i = 0;
  for (int64_t length : lengths) {
    for (size_t d = 0; d < depth_values.size(); ++d, i += 2) {
      AnswerCounts cell{static_cast<int64_t>(global[i]), static_cast<int64_t>(global[i + 1])};
      add(result.by_length[length], cell);
      if (needle) {
        add(result.by_depth[depths[d]], cell);
        add(result.by_cell[length][depths[d]], cell);
      }
    }
  }
  for (auto& [length, breakdown] : breakdowns) {
    breakdown.no_lookup = global[i++];
    for (auto* list : {&breakdown.by_query, &breakdown.by_pair})
      for (AnswerCounts& c : *list) {
        c = AnswerCounts{static_cast<int64_t>(global[i]), static_cast<int64_t>(global[i + 1])};
        i += 2;
      }
    result.recall_by_length[length] = breakdown;
  }
  return result;
}

nlohmann::json TaskEvalResult::to_json() const {
  nlohmann::json j = {{"task", task}};
  nlohmann::json acc = nlohmann::json::object();
  for (const auto& [length, c] : by_length) acc[std::to_string(length)] = c.accuracy();
  j["accuracy"] = acc;
  if (!by_depth.empty()) {
    nlohmann::json depth = nlohmann::json::object(), cells = nlohmann::json::object();
    for (const auto& [d, c] : by_depth) depth[d] = c.accuracy();
    for (const auto& [length, row] : by_cell)
      for (const auto& [d, c] : row) cells[std::to_string(length)][d] = c.accuracy();
    j["depth_accuracy"] = depth;
    j["length_depth_accuracy"] = cells;
  }
  if (!recall_by_length.empty()) {
    nlohmann::json by_query = nlohmann::json::object(), by_pair = nlohmann::json::object();
    for (const auto& [length, r] : recall_by_length) {
      for (const AnswerCounts& c : r.by_query) by_query[std::to_string(length)].push_back(c.accuracy());
      for (const AnswerCounts& c : r.by_pair) by_pair[std::to_string(length)].push_back(c.accuracy());
    }
    nlohmann::json no_lookup = nlohmann::json::object();
    for (const auto& [length, r] : recall_by_length) {
      int64_t answers = 0;
      for (const AnswerCounts& c : r.by_query) answers += c.total;
      if (answers > 0) no_lookup[std::to_string(length)] = r.no_lookup / static_cast<double>(answers);
    }
    j["query_accuracy"] = by_query;
    j["pair_accuracy"] = by_pair;
    j["no_lookup_accuracy"] = no_lookup;
  }
  return j;
}

double TaskEvalResult::mean_accuracy() const {
  AnswerCounts all;
  for (const auto& [length, c] : by_length) add(all, c);
  return all.accuracy();
}

std::string TaskEvalResult::table() const {
  std::string out;
  if (by_depth.empty()) {
    out += fmt::format("  {:>8} | {:>8} | {:>8}\n", "length", "accuracy", "answers");
    for (const auto& [length, c] : by_length)
      out += fmt::format("  {:>8} | {:>8.3f} | {:>8}\n", length, c.accuracy(), c.total);
    for (const auto& [length, r] : recall_by_length) {
      out += fmt::format("  {:>8} | by query:", length);
      for (const AnswerCounts& c : r.by_query) out += fmt::format(" {:.2f}", c.accuracy());
      out += fmt::format("\n  {:>8} | by pair: ", "");
      for (const AnswerCounts& c : r.by_pair) out += fmt::format(" {:.2f}", c.accuracy());
      int64_t answers = 0;
      for (const AnswerCounts& c : r.by_query) answers += c.total;
      if (answers > 0)
        out += fmt::format("\n  {:>8} | lookup-free guess (most frequent value among the pairs left): {:.3f}", "",
                           r.no_lookup / static_cast<double>(answers));
      out += "\n";
    }
    return out;
  }
  out += fmt::format("  {:>8} |", "len\\depth");
  for (const auto& [d, c] : by_depth) out += fmt::format(" {:>6} |", d);
  out += fmt::format(" {:>6}\n", "all");
  for (const auto& [length, row] : by_cell) {
    out += fmt::format("  {:>9} |", length);
    for (const auto& [d, c] : row) out += fmt::format(" {:>6.3f} |", c.accuracy());
    out += fmt::format(" {:>6.3f}\n", by_length.at(length).accuracy());
  }
  out += fmt::format("  {:>9} |", "all");
  for (const auto& [d, c] : by_depth) out += fmt::format(" {:>6.3f} |", c.accuracy());
  out += fmt::format(" {:>6.3f}\n", mean_accuracy());
  return out;
}

}  // namespace loom
