// Synthetic long-context tasks (see tasks.h). Every random choice of example i
// comes from Philox blocks (seed, counter = (i, stream, block)), so an example
// is a pure function of (seed, stream, i, seq_len, depth).
#include "framework/tasks.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "framework/error.h"
#include "framework/random.h"
#include "framework/tokenizer.h"

namespace loom {

TaskKind task_kind_from_name(const std::string& name) {
  if (name == "text") return TaskKind::text;
  if (name == "recall") return TaskKind::recall;
  if (name == "needle") return TaskKind::needle;
  LOOM_CHECK(false) << "data.task = \"" << name << "\" (allowed: text, recall, needle)";
  return TaskKind::text;
}

const char* task_kind_name(TaskKind kind) {
  switch (kind) {
    case TaskKind::text: return "text";
    case TaskKind::recall: return "recall";
    case TaskKind::needle: return "needle";
  }
  return "?";
}

namespace {

constexpr uint64_t kTaskKeySalt = 0x7A5C3E1DB4F09A61ull;  // keeps task draws apart from init/shuffle draws
constexpr char kPairSeparator = ':';
constexpr char kItemSeparator = ' ';
constexpr char kQueryStart = '|';

// Random words of one example: Philox block b = (seed ^ salt, index, stream << 32 | b).
class ExampleRandom {
 public:
  ExampleRandom(uint64_t seed, uint64_t stream, int64_t index)
      : key_(seed ^ kTaskKeySalt), index_(static_cast<uint64_t>(index)), stream_(stream << 32) {}
  uint32_t next() {
    if (used_ == 4) {
      philox4x32(key_, index_, stream_ | block_++, words_);
      used_ = 0;
    }
    return words_[used_++];
  }
  int64_t below(int64_t n) {  // uniform in [0, n), n < 2^32
    return static_cast<int64_t>((static_cast<uint64_t>(next()) * static_cast<uint64_t>(n)) >> 32);
  }
  double uniform() { return uniform_from_bits(next()); }

 private:
  uint64_t key_, index_, stream_, block_ = 0;
  uint32_t words_[4] = {0, 0, 0, 0};
  int used_ = 4;
};

int64_t key_space(int64_t key_len) {
  int64_t n = 1;
  for (int64_t i = 0; i < key_len && n < (int64_t{1} << 40); ++i) n *= 26;
  return n;
}

// `count` distinct values of [0, n), in random order.
std::vector<int64_t> distinct_draws(int64_t count, int64_t n, ExampleRandom& rng) {
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(count));
  if (n <= 4096) {  // partial Fisher-Yates
    std::vector<int64_t> all(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) all[static_cast<size_t>(i)] = i;
    for (int64_t i = 0; i < count; ++i) {
      int64_t j = i + rng.below(n - i);
      std::swap(all[static_cast<size_t>(i)], all[static_cast<size_t>(j)]);
      out.push_back(all[static_cast<size_t>(i)]);
    }
  } else {  // rejection: count <= n / something in practice
    std::unordered_set<int64_t> seen;
    while (static_cast<int64_t>(out.size()) < count) {
      int64_t v = static_cast<int64_t>(((static_cast<uint64_t>(rng.next()) << 32) | rng.next()) %
                                       static_cast<uint64_t>(n));
      if (seen.insert(v).second) out.push_back(v);
    }
  }
  return out;
}

void append_text(std::vector<int64_t>& seq, const std::string& text) {
  for (char c : text) seq.push_back(static_cast<unsigned char>(c));
}

// seq (T + 1 tokens) and answer flags -> inputs seq[0, T), targets seq[1, T] where answers, else -100.
void split_example(TaskExample& ex, const std::vector<int64_t>& seq, const std::vector<bool>& answer) {
  size_t t = seq.size() - 1;
  ex.inputs.assign(seq.begin(), seq.end() - 1);
  ex.targets.assign(t, kIgnoreTarget);
  for (size_t i = 0; i < t; ++i)
    if (answer[i + 1]) ex.targets[i] = seq[i + 1];
}

TaskExample recall_example(const RecallOptions& options, int64_t seq_len, ExampleRandom& rng) {
  std::string problem;
  RecallLayout layout = recall_layout(options, seq_len, &problem);
  LOOM_CHECK(problem.empty()) << problem;
  std::vector<int64_t> keys = distinct_draws(layout.pairs, key_space(layout.key_len), rng);
  std::vector<std::string> key_text(keys.size()), value_text(keys.size());
  for (size_t p = 0; p < keys.size(); ++p) {
    int64_t code = keys[p];
    for (int64_t i = 0; i < layout.key_len; ++i, code /= 26) key_text[p] += static_cast<char>('a' + code % 26);
    for (int64_t i = 0; i < layout.value_len; ++i) value_text[p] += static_cast<char>('0' + rng.below(10));
  }
  std::vector<int64_t> queried;
  if (layout.replace) {
    for (int64_t q = 0; q < layout.queries; ++q) queried.push_back(rng.below(layout.pairs));
  } else {
    queried = distinct_draws(layout.queries, layout.pairs, rng);
  }

  std::vector<int64_t> seq;
  std::vector<bool> answer;
  seq.reserve(static_cast<size_t>(seq_len + 1));
  auto item = [&](size_t p, bool is_query) {
    append_text(seq, key_text[p]);
    if (!layout.compact) seq.push_back(kPairSeparator);
    answer.resize(seq.size(), false);
    append_text(seq, value_text[p]);
    answer.resize(seq.size(), is_query);
    if (!layout.compact) seq.push_back(kItemSeparator);
  };
  for (size_t p = 0; p < keys.size(); ++p) item(p, false);
  seq.push_back(kQueryStart);
  for (int64_t q : queried) item(static_cast<size_t>(q), true);
  seq.resize(static_cast<size_t>(seq_len + 1), ByteTokenizer::kEndOfDocument);  // pad after the last query
  answer.resize(seq.size(), false);
  TaskExample ex;
  split_example(ex, seq, answer);
  return ex;
}

TaskExample needle_example(const std::string& corpus, int64_t seq_len, double depth, ExampleRandom& rng) {
  LOOM_CHECK(!corpus.empty()) << "needle task: the filler text is empty (data.text)";
  LOOM_CHECK(seq_len >= needle_min_seq_len()) << "needle task: seq_len " << seq_len << " is below "
                                              << needle_min_seq_len();
  std::string digits;
  for (int64_t i = 0; i < kNeedleDigits; ++i) digits += static_cast<char>('0' + rng.below(10));
  if (depth < 0) depth = rng.uniform();
  const std::string sentence = needle_sentence(digits), question = needle_question();
  const int64_t filler_len =
      seq_len + 1 - static_cast<int64_t>(sentence.size() + question.size()) - kNeedleDigits;  // F
  // A random window of the corpus (wrapping around when the corpus is short).
  const auto n = static_cast<int64_t>(corpus.size());
  int64_t start = rng.below(n);
  std::string filler;
  filler.reserve(static_cast<size_t>(filler_len));
  for (int64_t i = 0; i < filler_len; ++i) filler += corpus[static_cast<size_t>((start + i) % n)];
  // Insert at round(depth F), moved back to just after a space or line end (at most 32 bytes) so
  // that the needle does not split a word.
  auto at = static_cast<int64_t>(std::llround(depth * static_cast<double>(filler_len)));
  for (int64_t k = at; k >= std::max<int64_t>(0, at - 32); --k) {
    if (k == 0 || filler[static_cast<size_t>(k - 1)] == ' ' || filler[static_cast<size_t>(k - 1)] == '\n') {
      at = k;
      break;
    }
  }
  std::vector<int64_t> seq;
  seq.reserve(static_cast<size_t>(seq_len + 1));
  append_text(seq, filler.substr(0, static_cast<size_t>(at)));
  append_text(seq, sentence);
  append_text(seq, filler.substr(static_cast<size_t>(at)));
  append_text(seq, question);
  append_text(seq, digits);
  std::vector<bool> answer(seq.size(), false);
  for (int64_t i = 0; i < kNeedleDigits; ++i) answer[seq.size() - 1 - static_cast<size_t>(i)] = true;
  TaskExample ex;
  split_example(ex, seq, answer);
  ex.needle_start = at;
  ex.depth = depth;
  return ex;
}

}  // namespace

RecallLayout recall_layout(const RecallOptions& options, int64_t seq_len, std::string* problem) {
  RecallLayout l;
  l.key_len = options.key_len;
  l.value_len = options.value_len;
  LOOM_CHECK(options.draw == "distinct" || options.draw == "replace")
      << "data.recall.draw = \"" << options.draw << "\": expected distinct or replace";
  l.replace = options.draw == "replace";
  LOOM_CHECK(options.format == "spaced" || options.format == "compact")
      << "data.recall.format = \"" << options.format << "\": expected spaced or compact";
  l.compact = options.format == "compact";
  const int64_t item = l.item_tokens(), keys = key_space(l.key_len);
  if (options.pairs == 0 && options.queries == 0) {
    l.pairs = l.queries = std::min(seq_len / (2 * item), keys);
  } else if (options.pairs == 0) {
    l.queries = options.queries;
    l.pairs = std::min(std::max<int64_t>(0, (seq_len - options.queries * item) / item), keys);
  } else {
    l.pairs = options.pairs;
    l.queries = options.queries == 0 ? options.pairs : options.queries;
  }
  std::string p;
  std::string shape = fmt::format("data.recall.pairs = {}, queries = {}, key_len = {}, value_len = {}", options.pairs,
                                  options.queries, options.key_len, options.value_len);
  if (l.pairs > keys) {
    p = fmt::format("{}: {} pairs need distinct keys but key_len {} gives only {}", shape, l.pairs, l.key_len, keys);
  } else if (l.pairs < 1 || l.queries < 1 || (!l.replace && l.queries > l.pairs)) {
    p = fmt::format("{}, draw = {} gives {} pairs and {} queries in {} tokens; need at least one pair, and "
                    "queries <= pairs unless draw = replace (each {} item takes {} tokens)",
                    shape, options.draw, l.pairs, l.queries, seq_len, options.format, item);
  } else if (l.tokens() > seq_len + 1) {
    p = fmt::format("{}: {} pairs + {} queries take {} tokens, more than seq_len {} (+1) (each {} item takes "
                    "{} tokens, plus one '|')",
                    shape, l.pairs, l.queries, l.tokens(), seq_len, options.format, item);
  }
  if (problem) *problem = p;
  return p.empty() ? l : RecallLayout{};
}

std::string needle_sentence(const std::string& digits) { return "The secret number is " + digits + ". "; }
std::string needle_question() { return "\nWhat is the secret number? "; }
int64_t needle_min_seq_len() {
  return static_cast<int64_t>(needle_sentence(std::string(kNeedleDigits, '0')).size() + needle_question().size()) +
         kNeedleDigits + kNeedleMinFiller - 1;
}

std::vector<double> needle_depths(const std::vector<std::string>& depths) {
  std::vector<double> out;
  for (const std::string& d : depths) {
    double v = -1;
    size_t used = 0;
    try {
      v = std::stod(d, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    LOOM_CHECK(used == d.size() && v >= 0 && v <= 1) << "data.needle.depths entry \"" << d
                                                     << "\" is not a number in [0, 1]";
    out.push_back(v);
  }
  return out;
}

TaskSpec task_spec_from(const DataConfig& data) {
  TaskSpec spec;
  spec.kind = task_kind_from_name(data.task);
  LOOM_CHECK(spec.kind != TaskKind::text) << "task_spec_from: data.task = text is not a synthetic task";
  spec.recall = data.recall;
  if (spec.kind == TaskKind::needle) {
    std::string path = data.text.empty() ? find_demo_corpus() : data.text;
    spec.filler = std::make_shared<const std::string>(read_text_file(path));
    LOOM_CHECK(!spec.filler->empty()) << "needle task: filler text " << path << " is empty";
  }
  return spec;
}

uint64_t task_eval_stream(int64_t seq_len, int64_t depth_index) {
  return (static_cast<uint64_t>(seq_len) << 8) | static_cast<uint64_t>(depth_index + 1);
}

TaskExample make_task_example(const TaskSpec& spec, int64_t seq_len, uint64_t seed, uint64_t stream, int64_t index,
                              double depth) {
  ExampleRandom rng(seed, stream, index);
  switch (spec.kind) {
    case TaskKind::recall: return recall_example(spec.recall, seq_len, rng);
    case TaskKind::needle:
      LOOM_CHECK(spec.filler) << "needle task without filler text";
      return needle_example(*spec.filler, seq_len, depth, rng);
    case TaskKind::text: break;
  }
  LOOM_CHECK(false) << "make_task_example: data.task = text has no synthetic examples";
  return {};
}

TaskDataset::TaskDataset(TaskSpec spec, uint64_t seed, int64_t global_batch, int64_t dp_rank, int64_t dp_size)
    : spec_(std::move(spec)), seed_(seed), global_batch_(global_batch), dp_rank_(dp_rank), dp_size_(dp_size) {
  LOOM_CHECK(dp_size > 0 && dp_rank >= 0 && dp_rank < dp_size) << "dp rank " << dp_rank << " of " << dp_size;
  LOOM_CHECK(global_batch > 0 && global_batch % dp_size == 0)
      << "global batch " << global_batch << " is not a positive multiple of the dp size " << dp_size;
}

Batch TaskDataset::batch(int64_t first_example, int64_t seq_len, uint64_t stream, double depth) const {
  const int64_t b = local_batch();
  Batch out;
  out.inputs = Tensor::empty({b, seq_len}, DType::i64);   // (B, T)
  out.targets = Tensor::empty({b, seq_len}, DType::i64);  // (B, T)
  int64_t* in = out.inputs.data<int64_t>();
  int64_t* tg = out.targets.data<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    TaskExample ex = make_task_example(spec_, seq_len, seed_, stream, first_example + dp_rank_ * b + i, depth);
    std::copy(ex.inputs.begin(), ex.inputs.end(), in + i * seq_len);
    std::copy(ex.targets.begin(), ex.targets.end(), tg + i * seq_len);
  }
  out.step = first_example / global_batch_;
  return out;
}

AnswerCounts answer_accuracy(const Tensor& logits, const Tensor& targets) {
  LOOM_CHECK(logits.dim() == 3 && targets.dim() == 2 && logits.size(0) == targets.size(0) &&
             logits.size(1) == targets.size(1))
      << "answer_accuracy: logits " << shape_str(logits.shape()) << " and targets " << shape_str(targets.shape())
      << " must be (B, T, V) and (B, T)";
  Tensor l = logits.to(Device::cpu()).to(DType::f32).contiguous();
  std::vector<int64_t> t = targets.to(Device::cpu()).to_vector<int64_t>();
  const int64_t v = l.size(2);
  const float* data = l.data<float>();
  AnswerCounts counts;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] == kIgnoreTarget) continue;
    const float* row = data + static_cast<int64_t>(i) * v;
    int64_t best = std::max_element(row, row + v) - row;  // first maximum
    counts.total += 1;
    counts.correct += best == t[i] ? 1 : 0;
  }
  return counts;
}

void add_recall_breakdown(RecallBreakdown& into, const Tensor& logits, const Tensor& inputs, const Tensor& targets,
                          const RecallLayout& layout) {
  LOOM_CHECK(logits.dim() == 3 && inputs.dim() == 2 && inputs.shape() == targets.shape() &&
             logits.size(0) == inputs.size(0) && logits.size(1) == inputs.size(1))
      << "add_recall_breakdown: logits " << shape_str(logits.shape()) << ", inputs " << shape_str(inputs.shape())
      << " and targets " << shape_str(targets.shape()) << " must be (B, T, V), (B, T), (B, T)";
  const int64_t b = inputs.size(0), t = inputs.size(1), v = logits.size(2), item = layout.item_tokens();
  LOOM_CHECK(layout.pairs > 0 && layout.tokens() <= t + 1)
      << "add_recall_breakdown: " << layout.pairs << " pairs + " << layout.queries << " queries take "
      << layout.tokens() << " tokens, the batch has " << t << " (+1)";
  into.by_query.resize(static_cast<size_t>(std::max<int64_t>(layout.queries, into.by_query.size())));
  into.by_pair.resize(static_cast<size_t>(std::max<int64_t>(layout.pairs, into.by_pair.size())));
  Tensor l = logits.to(Device::cpu()).to(DType::f32).contiguous();
  std::vector<int64_t> in = inputs.to(Device::cpu()).to_vector<int64_t>();
  std::vector<int64_t> tg = targets.to(Device::cpu()).to_vector<int64_t>();
  const float* data = l.data<float>();
  for (int64_t r = 0; r < b; ++r) {
    const int64_t* row = in.data() + r * t;
    if (layout.value_len == 1) {  // the lookup-free guess: the most frequent value among the pairs left
      std::vector<int64_t> left(ByteTokenizer::kVocabSize, 0);  // value token -> pairs (not yet queried) holding it
      for (int64_t p = 0; p < layout.pairs; ++p) left[static_cast<size_t>(row[p * item + layout.value_offset()])] += 1;
      for (int64_t q = 0; q < layout.queries; ++q) {
        // The answer from the targets: in the compact format the last one is past the inputs.
        const int64_t value = tg[static_cast<size_t>(r * t + (layout.pairs + q) * item + layout.value_offset())];
        LOOM_CHECK(value >= 0 && value < ByteTokenizer::kVocabSize)
            << "add_recall_breakdown: row " << r << ", query " << q << ": no target at position "
            << (layout.pairs + q) * item + layout.value_offset() << " (the layout's first answer)";
        const int64_t most = *std::max_element(left.begin(), left.end());
        if (left[static_cast<size_t>(value)] == most)
          into.no_lookup += 1.0 / static_cast<double>(std::count(left.begin(), left.end(), most));
        if (!layout.replace) left[static_cast<size_t>(value)] -= 1;  // with replacement every pair stays possible
      }
    }
    for (int64_t q = 0; q < layout.queries; ++q) {
      const int64_t start = (layout.pairs + q) * item + 1;  // the query's first key token
      int64_t pair = -1;
      for (int64_t p = 0; p < layout.pairs && pair < 0; ++p)
        if (std::equal(row + start, row + start + layout.key_len, row + p * item)) pair = p;
      LOOM_CHECK(pair >= 0) << "add_recall_breakdown: row " << r << ", query " << q << ": its key is not a pair's key";
      for (int64_t j = 0; j < layout.value_len; ++j) {
        const int64_t at = r * t + start + layout.value_offset() + j - 1;  // the token before value token j
        LOOM_CHECK(tg[static_cast<size_t>(at)] != kIgnoreTarget)
            << "add_recall_breakdown: row " << r << ", query " << q << ": no target at position " << at - r * t;
        const float* logit_row = data + at * v;
        const bool correct = std::max_element(logit_row, logit_row + v) - logit_row == tg[static_cast<size_t>(at)];
        for (AnswerCounts* c : {&into.by_query[static_cast<size_t>(q)], &into.by_pair[static_cast<size_t>(pair)]}) {
          c->total += 1;
          c->correct += correct ? 1 : 0;
        }
      }
    }
  }
}

}  // namespace loom
