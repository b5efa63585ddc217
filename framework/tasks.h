// Synthetic long-context tasks, generated in-process from a seed: multi-query
// associative recall (MQAR) and needle retrieval. Sequences are byte tokens
// (the 257-id byte vocabulary), and the targets are -100 everywhere except at
// the answer tokens, so the loss and the accuracy count only what the task
// asks for.
//
//   recall  "ab:37 qx:05 ... |qx:05 ab:37 ..." — key:value pairs, a '|', then
//           queries repeating keys; the targets are the value bytes after each
//           queried key. Keys are lowercase letters, values digits (disjoint
//           alphabets); keys of one sequence are distinct. Queries take each
//           key at most once (data.recall.draw = distinct) or draw keys
//           independently (replace: no answer given narrows the next).
//           data.recall.format = compact drops the ':' and ' ' ("ab37qx05...|qx05"):
//           each answer then follows its key directly.
//   needle  filler text from a corpus with "The secret number is 4821. " at a
//           depth in [0, 1] (snapped back to a space), then
//           "\nWhat is the secret number? 4821"; the 4 digits are the targets.
//
// Example i of a stream depends only on (seed, stream, i), through Philox, so
// every dp layout sees the same examples: rank r of P takes rows
// [r B, (r+1) B) of each global batch, like the DataLoader.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/data.h"
#include "framework/tensor.h"

namespace loom {

enum class TaskKind { text, recall, needle };
TaskKind task_kind_from_name(const std::string& name);  // throws naming the value
const char* task_kind_name(TaskKind kind);

inline constexpr int64_t kIgnoreTarget = -100;

// ---------------------------------------------------------------- recall

struct RecallLayout {
  int64_t pairs = 0, queries = 0, key_len = 0, value_len = 0;
  bool replace = false;  // queries draw keys with replacement (queries may exceed pairs)
  bool compact = false;  // "keyvalue" items instead of "key:value "
  int64_t item_tokens() const { return key_len + value_len + (compact ? 0 : 2); }
  int64_t value_offset() const { return key_len + (compact ? 0 : 1); }  // first value token within an item
  int64_t tokens() const { return (pairs + queries) * item_tokens() + 1; }  // + the '|'
};
// The pairs and queries for a sequence of seq_len tokens (data.recall.pairs = 0
// fills the sequence, data.recall.queries = 0 queries every key). Sets *problem
// (naming the keys and values) and returns {} when it does not fit.
RecallLayout recall_layout(const RecallOptions& options, int64_t seq_len, std::string* problem);

// ---------------------------------------------------------------- needle

inline constexpr int64_t kNeedleDigits = 4;
inline constexpr int64_t kNeedleMinFiller = 16;  // filler bytes a sequence needs at least
std::string needle_sentence(const std::string& digits);  // "The secret number is 4821. "
std::string needle_question();                           // "\nWhat is the secret number? "
int64_t needle_min_seq_len();  // sentence + question + digits + kNeedleMinFiller - 1
// data.needle.depths parsed; throws naming a value that is not a number in [0, 1].
std::vector<double> needle_depths(const std::vector<std::string>& depths);

// ---------------------------------------------------------------- examples

struct TaskSpec {
  TaskKind kind = TaskKind::recall;
  RecallOptions recall;
  std::shared_ptr<const std::string> filler;  // needle: the corpus text
};
// The spec of data.task (needle: reads data.text, or the demo corpus when empty).
TaskSpec task_spec_from(const DataConfig& data);

// One sequence of T input tokens and T targets (the inputs shifted by one, -100
// except at answers). needle_start: where the needle sentence starts in the
// input (needle only), depth: the depth asked for.
struct TaskExample {
  std::vector<int64_t> inputs, targets;
  int64_t needle_start = -1;
  double depth = -1;
};
// Example `index` of stream `stream` for sequence length `seq_len`. depth < 0:
// a random depth (needle training); else that depth.
TaskExample make_task_example(const TaskSpec& spec, int64_t seq_len, uint64_t seed, uint64_t stream, int64_t index,
                              double depth = -1);

// Streams: training, and one evaluation set per (length, depth).
inline constexpr uint64_t kTaskTrainStream = 0;
uint64_t task_eval_stream(int64_t seq_len, int64_t depth_index);

// A dp rank's share of task batches.
class TaskDataset {
 public:
  TaskDataset(TaskSpec spec, uint64_t seed, int64_t global_batch, int64_t dp_rank, int64_t dp_size);
  // Global rows [first_example, first_example + B_global) of `stream`; this rank
  // keeps rows [r B, (r+1) B). inputs, targets: (B, T) i64.
  Batch batch(int64_t first_example, int64_t seq_len, uint64_t stream = kTaskTrainStream, double depth = -1) const;
  int64_t global_batch() const { return global_batch_; }
  int64_t local_batch() const { return global_batch_ / dp_size_; }
  const TaskSpec& spec() const { return spec_; }

 private:
  TaskSpec spec_;
  uint64_t seed_;
  int64_t global_batch_, dp_rank_, dp_size_;
};

// ---------------------------------------------------------------- accuracy

struct AnswerCounts {
  int64_t correct = 0, total = 0;
  double accuracy() const { return total > 0 ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
};
// Greedy answers: positions with target != -100 count, and are correct when the
// argmax of the logits there equals the target. logits (B, T, V) f32, targets (B, T) i64.
AnswerCounts answer_accuracy(const Tensor& logits, const Tensor& targets);

// Recall answers split by where they are: by_query[q] counts the answers of the
// q-th query after the '|', by_pair[p] those whose key is the p-th pair of the
// context. Shows which answers a model gets (first or late pairs, first or last
// queries) when the total sits between chance and 1.
// no_lookup: the expected correct answers of the best strategy that never
// matches a key (value_len 1; ties split evenly). Distinct draws: guess the
// most frequent value among the pairs not yet queried — every key is queried
// once and the answered values stay in the input, so this alone reaches
// ~0.59 / 0.46 / 0.36 at 4 / 8 / 16 pairs. Draws with replacement: guess the
// most frequent value among all pairs (~0.43 / 0.27 / 0.19). An accuracy near
// it means no recall was learned.
struct RecallBreakdown {
  std::vector<AnswerCounts> by_query, by_pair;
  double no_lookup = 0;  // expected correct answers of the lookup-free guess (value_len 1 only)
};
// Adds the greedy answers of one batch laid out as `layout` (the layout of the
// batch's seq_len); inputs, targets (B, T) i64, logits (B, T, V). Throws when a
// target is not where the layout puts the answers.
void add_recall_breakdown(RecallBreakdown& into, const Tensor& logits, const Tensor& inputs, const Tensor& targets,
                          const RecallLayout& layout);

}  // namespace loom
