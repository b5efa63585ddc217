// Synthetic long-context tasks: examples are a function of (seed, stream,
// index) only, so any dp split sees the 1-rank batch; targets are masked except
// at answers; recall answers can be read back from the context; the needle sits
// at the requested depth; greedy accuracy on hand-built logits; config errors.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <tuple>

#include "framework/config.h"
#include "framework/error.h"
#include "framework/tasks.h"
#include "framework/tokenizer.h"
#include "launch/trainer/task_eval.h"

namespace loom {
namespace {

TaskSpec recall_spec(int64_t pairs = 0, int64_t queries = 0, int64_t key_len = 2, int64_t value_len = 2,
                     const std::string& draw = "distinct", const std::string& format = "spaced") {
  TaskSpec spec;
  spec.kind = TaskKind::recall;
  spec.recall = RecallOptions{pairs, queries, key_len, value_len, draw, format};
  return spec;
}

std::string filler_corpus() {
  std::string text;
  const char* words[] = {"alpha", "beta", "gamma", "delta", "kernel", "hacker", "ran", "the"};
  uint32_t x = 7;
  for (int i = 0; i < 3000; ++i) {
    x = x * 1664525u + 1013904223u;
    text += words[(x >> 16) % 8];
    text += (i % 13 == 12) ? "\n" : " ";
  }
  return text;
}

TaskSpec needle_spec() {
  TaskSpec spec;
  spec.kind = TaskKind::needle;
  spec.filler = std::make_shared<const std::string>(filler_corpus());
  return spec;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Tasks, RecallLayoutFillsTheSequenceOrNamesWhatDoesNotFit) {
  std::string problem;
  RecallLayout l = recall_layout(RecallOptions{0, 0, 2, 2}, 128, &problem);  // items of 6 tokens
  EXPECT_EQ(problem, "");
  EXPECT_EQ(l.pairs, 10);
  EXPECT_EQ(l.queries, 10);
  EXPECT_LE(l.tokens(), 129);
  l = recall_layout(RecallOptions{0, 4, 2, 2}, 128, &problem);
  EXPECT_EQ(l.queries, 4);
  EXPECT_EQ(l.pairs, (128 - 4 * 6) / 6);
  l = recall_layout(RecallOptions{0, 0, 1, 1}, 1024, &problem);  // capped by the 26 distinct keys
  EXPECT_EQ(l.pairs, 26);

  recall_layout(RecallOptions{30, 0, 2, 2}, 128, &problem);
  EXPECT_NE(problem.find("data.recall.pairs = 30"), std::string::npos) << problem;
  EXPECT_NE(problem.find("more than seq_len 128"), std::string::npos) << problem;
  recall_layout(RecallOptions{27, 1, 1, 1}, 1024, &problem);
  EXPECT_NE(problem.find("only 26"), std::string::npos) << problem;
  recall_layout(RecallOptions{3, 5, 2, 2}, 128, &problem);
  EXPECT_NE(problem.find("queries <= pairs"), std::string::npos) << problem;
  recall_layout(RecallOptions{0, 0, 2, 2}, 8, &problem);
  EXPECT_NE(problem.find("at least one pair"), std::string::npos) << problem;

  // With replacement, queries may outnumber the pairs.
  l = recall_layout(RecallOptions{3, 5, 2, 2, "replace"}, 128, &problem);
  EXPECT_EQ(problem, "");
  EXPECT_EQ(l.pairs, 3);
  EXPECT_EQ(l.queries, 5);
  EXPECT_TRUE(l.replace);
  l = recall_layout(RecallOptions{0, 12, 1, 1, "replace"}, 64, &problem);
  EXPECT_EQ(problem, "");
  EXPECT_EQ(l.pairs, (64 - 12 * 4) / 4);
  EXPECT_NE(error_of([&] { recall_layout(RecallOptions{0, 0, 1, 1, "sorted"}, 64, &problem); }).find("sorted"),
            std::string::npos);
}

TEST(Tasks, ExamplesAreAFunctionOfSeedStreamAndIndex) {
  for (const TaskSpec& spec : {recall_spec(), needle_spec()}) {
    TaskExample a = make_task_example(spec, 128, 42, kTaskTrainStream, 5);
    TaskExample b = make_task_example(spec, 128, 42, kTaskTrainStream, 5);
    EXPECT_EQ(a.inputs, b.inputs);
    EXPECT_EQ(a.targets, b.targets);
    EXPECT_EQ(a.inputs.size(), 128u);
    EXPECT_NE(make_task_example(spec, 128, 43, kTaskTrainStream, 5).inputs, a.inputs);
    EXPECT_NE(make_task_example(spec, 128, 42, kTaskTrainStream, 6).inputs, a.inputs);
    EXPECT_NE(make_task_example(spec, 128, 42, task_eval_stream(128, 0), 5).inputs, a.inputs);
  }
}

TEST(Tasks, AnyDpSplitGivesTheOneRankBatch) {
  for (const TaskSpec& spec : {recall_spec(), needle_spec()}) {
    const int64_t global = 6, t = 96;
    TaskDataset one(spec, 7, global, 0, 1);
    for (int64_t first : {int64_t{0}, int64_t{18}}) {
      Batch whole = one.batch(first, t);
      ASSERT_EQ(whole.inputs.shape(), (Shape{global, t}));
      std::vector<int64_t> in = whole.inputs.to_vector<int64_t>(), tg = whole.targets.to_vector<int64_t>();
      for (int64_t p : {1, 2, 3, 6}) {
        std::vector<int64_t> joined_in, joined_tg;
        for (int64_t r = 0; r < p; ++r) {
          Batch part = TaskDataset(spec, 7, global, r, p).batch(first, t);
          ASSERT_EQ(part.inputs.shape(), (Shape{global / p, t}));
          std::vector<int64_t> a = part.inputs.to_vector<int64_t>(), b = part.targets.to_vector<int64_t>();
          joined_in.insert(joined_in.end(), a.begin(), a.end());
          joined_tg.insert(joined_tg.end(), b.begin(), b.end());
        }
        EXPECT_EQ(joined_in, in) << "P = " << p << ", first example " << first;
        EXPECT_EQ(joined_tg, tg) << "P = " << p << ", first example " << first;
      }
    }
  }
  EXPECT_NE(error_of([] { TaskDataset(recall_spec(), 1, 5, 0, 2); }).find("multiple of the dp size 2"),
            std::string::npos);
}

// Reads the pairs before '|' and checks every unmasked target against them.
TEST(Tasks, RecallAnswersAreTheValuesOfTheQueriedKeysAndAllElseIsMasked) {
  for (auto [key_len, value_len, t, queries, draw, format] :
       {std::tuple{2, 2, 128, 0, "distinct", "spaced"}, std::tuple{1, 3, 61, 0, "distinct", "spaced"},
        std::tuple{3, 1, 300, 0, "distinct", "spaced"}, std::tuple{1, 1, 64, 12, "replace", "spaced"},
        std::tuple{2, 2, 128, 0, "replace", "spaced"}, std::tuple{1, 1, 64, 0, "replace", "compact"},
        std::tuple{2, 3, 100, 0, "distinct", "compact"}}) {
    const bool replace = std::string(draw) == "replace", compact = std::string(format) == "compact";
    TaskSpec spec = recall_spec(0, queries, key_len, value_len, draw, format);
    int64_t repeated = 0;  // queries of a key asked before (replace only)
    std::string problem;
    RecallLayout layout = recall_layout(spec.recall, t, &problem);
    ASSERT_EQ(problem, "");
    for (int64_t index = 0; index < 20; ++index) {
      TaskExample ex = make_task_example(spec, t, 3, kTaskTrainStream, index);
      // inputs followed by the last target gives the whole sequence of T + 1 tokens.
      std::vector<int64_t> seq = ex.inputs;
      seq.push_back(ex.targets.back() == kIgnoreTarget ? ByteTokenizer::kEndOfDocument : ex.targets.back());
      std::string text;
      for (int64_t id : seq) text += id < 256 ? static_cast<char>(id) : '#';
      size_t bar = text.find('|');
      ASSERT_NE(bar, std::string::npos) << text;
      std::map<std::string, std::string> pairs;
      // spaced items "key:value ", compact items "keyvalue"
      const size_t item = static_cast<size_t>(key_len + value_len + (compact ? 0 : 2));
      const size_t value_at = static_cast<size_t>(key_len + (compact ? 0 : 1));
      for (size_t p = 0; p + item <= bar; p += item) {
        std::string key = text.substr(p, static_cast<size_t>(key_len));
        if (!compact) {
          ASSERT_EQ(text[p + static_cast<size_t>(key_len)], ':') << text;
        }
        if (!compact) {
          ASSERT_EQ(text[p + item - 1], ' ') << text;
        }
        for (char c : key) ASSERT_TRUE(c >= 'a' && c <= 'z') << text;
        ASSERT_EQ(pairs.count(key), 0u) << "key " << key << " twice in " << text;
        pairs[key] = text.substr(p + value_at, static_cast<size_t>(value_len));
        for (char c : pairs[key]) ASSERT_TRUE(c >= '0' && c <= '9') << text;
      }
      ASSERT_EQ(bar, static_cast<size_t>(layout.pairs) * item) << text;
      ASSERT_EQ(static_cast<int64_t>(pairs.size()), layout.pairs);
      // Each query: its key, ':' (spaced), then the value digits, which are the only targets.
      std::vector<bool> expected_answer(seq.size(), false);
      std::set<std::string> queried;
      for (int64_t q = 0; q < layout.queries; ++q) {
        size_t p = bar + 1 + static_cast<size_t>(q) * item;
        std::string key = text.substr(p, static_cast<size_t>(key_len));
        ASSERT_EQ(pairs.count(key), 1u) << "query " << key << " not among the pairs of " << text;
        const bool first = queried.insert(key).second;
        if (!replace) {
          EXPECT_TRUE(first) << "key " << key << " queried twice";
        }
        repeated += first ? 0 : 1;
        size_t v = p + value_at;
        EXPECT_EQ(text.substr(v, static_cast<size_t>(value_len)), pairs[key]);
        for (size_t i = 0; i < static_cast<size_t>(value_len); ++i) expected_answer[v + i] = true;
      }
      int64_t answers = 0;
      for (size_t i = 0; i < ex.targets.size(); ++i) {
        if (expected_answer[i + 1]) {
          EXPECT_EQ(ex.targets[i], seq[i + 1]) << "position " << i;
          EXPECT_TRUE(seq[i + 1] >= '0' && seq[i + 1] <= '9');
          ++answers;
        } else {
          EXPECT_EQ(ex.targets[i], kIgnoreTarget) << "position " << i << " of " << text;
        }
      }
      EXPECT_EQ(answers, layout.queries * value_len);
    }
    // 20 examples of 10+ independent draws among <= 12 keys repeat some key (P(no repeat) < 1e-9).
    if (replace) {
      EXPECT_GT(repeated, 0) << "draw = replace never repeated a key";
    }
  }
}

TEST(Tasks, NeedleSitsAtTheRequestedDepthAndOnlyItsDigitsAreTargets) {
  TaskSpec spec = needle_spec();
  for (int64_t t : {needle_min_seq_len(), int64_t{128}, int64_t{500}}) {
    const int64_t filler = t + 1 - static_cast<int64_t>(needle_sentence("0000").size() + needle_question().size()) -
                           kNeedleDigits;
    for (double depth : {0.0, 0.1, 0.5, 0.9, 1.0}) {
      for (int64_t index = 0; index < 5; ++index) {
        TaskExample ex = make_task_example(spec, t, 11, task_eval_stream(t, 0), index, depth);
        ASSERT_EQ(static_cast<int64_t>(ex.inputs.size()), t);
        std::string text;
        for (int64_t id : ex.inputs) text += static_cast<char>(id);
        // The needle starts where it says, at most one filler word (<= 32 bytes) before round(depth F).
        ASSERT_GE(ex.needle_start, 0);
        double wanted = depth * static_cast<double>(filler);
        EXPECT_LE(static_cast<double>(ex.needle_start), wanted + 0.5) << "depth " << depth << " T " << t;
        EXPECT_GE(static_cast<double>(ex.needle_start), wanted - 33.0) << "depth " << depth << " T " << t;
        ASSERT_EQ(text.compare(static_cast<size_t>(ex.needle_start), 21, "The secret number is "), 0) << text;
        std::string digits = text.substr(static_cast<size_t>(ex.needle_start) + 21, kNeedleDigits);
        // The question ends the input; the digits are the last kNeedleDigits targets and nothing else.
        std::string question = needle_question();
        ASSERT_EQ(text.substr(text.size() - question.size() - kNeedleDigits + 1, question.size()), question);
        for (int64_t i = 0; i < t; ++i) {
          int64_t from_end = t - 1 - i;
          if (from_end < kNeedleDigits)
            EXPECT_EQ(ex.targets[static_cast<size_t>(i)], digits[static_cast<size_t>(kNeedleDigits - 1 - from_end)]);
          else
            EXPECT_EQ(ex.targets[static_cast<size_t>(i)], kIgnoreTarget) << "position " << i;
        }
      }
    }
  }
  // Training examples draw their depth.
  TaskExample a = make_task_example(spec, 200, 1, kTaskTrainStream, 0), b = make_task_example(spec, 200, 1, 0, 1);
  EXPECT_GE(a.depth, 0.0);
  EXPECT_LE(a.depth, 1.0);
  EXPECT_NE(a.depth, b.depth);
}

TEST(Tasks, AnswerAccuracyCountsGreedyMatchesAtTargetsOnly) {
  // B = 2, T = 3, V = 4; targets at (0, 1), (1, 0), (1, 2).
  Tensor logits = Tensor::zeros({2, 3, 4});
  float* l = logits.data<float>();
  auto at = [&](int64_t b, int64_t t, int64_t v) -> float& { return l[(b * 3 + t) * 4 + v]; };
  at(0, 0, 3) = 9;  // not a target: ignored
  at(0, 1, 2) = 5;  // target 2: correct
  at(1, 0, 1) = 1;  // target 3: wrong (argmax 1)
  at(1, 2, 0) = 2;
  at(1, 2, 3) = 2;  // tie of 0 and 3: the first maximum (0) counts, target 3: wrong
  Tensor targets = Tensor::from_vector(std::vector<int64_t>{-100, 2, -100, 3, -100, 3}, {2, 3});
  AnswerCounts c = answer_accuracy(logits, targets);
  EXPECT_EQ(c.total, 3);
  EXPECT_EQ(c.correct, 1);
  EXPECT_NEAR(c.accuracy(), 1.0 / 3.0, 1e-12);
  at(1, 0, 3) = 4;
  at(1, 2, 3) = 3;
  EXPECT_EQ(answer_accuracy(logits, targets).correct, 3);
  EXPECT_EQ(answer_accuracy(logits, Tensor::full({2, 3}, -100, DType::i64)).total, 0);
  EXPECT_NE(error_of([&] { answer_accuracy(logits, Tensor::zeros({2, 4}, DType::i64)); }).find("(B, T, V)"),
            std::string::npos);
}

TEST(Tasks, RecallBreakdownCountsEachAnswerUnderItsQueryAndItsPair) {
  // An oracle that reads each query's value from the pairs is right at every
  // answer; then the answers of query 2 and of the pair in context slot 5 are
  // made wrong, and only their rows of the breakdown drop.
  for (auto [value_len, format] : {std::pair<int64_t, const char*>{1, "spaced"}, {2, "spaced"}, {1, "compact"},
                                   {2, "compact"}}) {
    SCOPED_TRACE(format);
    TaskSpec spec = recall_spec(0, 0, 1, value_len, "distinct", format);
    const int64_t t = 64, b = 3, v = 257;
    const int64_t value_at = std::string(format) == "compact" ? 1 : 2;  // key_len 1 (+ ':')
    std::string problem;
    RecallLayout layout = recall_layout(spec.recall, t, &problem);
    ASSERT_EQ(problem, "");
    TaskDataset data(spec, 5, b, 0, 1);
    Batch batch = data.batch(0, t, task_eval_stream(t, 0));
    std::vector<int64_t> in = batch.inputs.to_vector<int64_t>(), tg = batch.targets.to_vector<int64_t>();
    Tensor logits = Tensor::zeros({b, t, v});  // (B, T, V)
    float* l = logits.data<float>();
    const int64_t item = layout.item_tokens();
    int64_t wrong_pair = 0, wrong_query = 0;
    for (int64_t r = 0; r < b; ++r)
      for (int64_t q = 0; q < layout.queries; ++q) {
        const int64_t start = (layout.pairs + q) * item + 1;
        int64_t pair = 0;
        while (in[static_cast<size_t>(r * t + pair * item)] != in[static_cast<size_t>(r * t + start)]) ++pair;
        for (int64_t j = 0; j < value_len; ++j) {
          const int64_t at = r * t + start + value_at - 1 + j;  // the token before value token j
          int64_t value = in[static_cast<size_t>(r * t + pair * item + value_at + j)];
          ASSERT_EQ(tg[static_cast<size_t>(at)], value) << "row " << r << " query " << q;
          const bool wrong = q == 2 || pair == 5;
          wrong_pair += pair == 5 ? 1 : 0;
          wrong_query += q == 2 ? 1 : 0;
          l[at * v + (wrong ? (value == '0' ? '1' : '0') : value)] = 1.0f;
        }
      }
    RecallBreakdown r;
    add_recall_breakdown(r, logits, batch.inputs, batch.targets, layout);
    ASSERT_EQ(static_cast<int64_t>(r.by_query.size()), layout.queries);
    ASSERT_EQ(static_cast<int64_t>(r.by_pair.size()), layout.pairs);
    EXPECT_EQ(wrong_query, b * value_len);
    EXPECT_EQ(wrong_pair, b * value_len);  // every pair is queried once
    int64_t total = 0, correct = 0;
    for (int64_t q = 0; q < layout.queries; ++q) {
      const AnswerCounts& c = r.by_query[static_cast<size_t>(q)];
      EXPECT_EQ(c.total, b * value_len) << "query " << q;
      total += c.total;
      correct += c.correct;
      if (q == 2) {
        EXPECT_EQ(c.correct, 0);
      }
    }
    EXPECT_EQ(r.by_pair[5].correct, 0);
    EXPECT_EQ(r.by_pair[5].total, b * value_len);
    for (int64_t p = 0; p < layout.pairs; ++p) EXPECT_EQ(r.by_pair[static_cast<size_t>(p)].total, b * value_len);
    // The totals agree with answer_accuracy over the same logits.
    AnswerCounts all = answer_accuracy(logits, batch.targets);
    EXPECT_EQ(all.total, total);
    EXPECT_EQ(all.correct, correct);
    // A batch laid out differently (targets moved) is refused.
    Tensor shifted = Tensor::full({b, t}, kIgnoreTarget, DType::i64);
    EXPECT_NE(error_of([&] { add_recall_breakdown(r, logits, batch.inputs, shifted, layout); }).find("no target"),
              std::string::npos);
  }
}

TEST(Tasks, RecallLookupFreeGuessIsTheMostFrequentValueNotYetQueried) {
  // "a:1 b:1 c:2 d:3 |c:2 a:1 d:3 b:1": values left {1, 1, 2, 3}. Query c (2):
  // the guess is 1, wrong; then {1, 1, 3}, a (1): right; {1, 3}, d (3): a tie,
  // right half the time; {1}, b (1): right. 2.5 expected correct answers of 4.
  const std::string text = "a:1 b:1 c:2 d:3 |c:2 a:1 d:3 b:1 ";
  std::string problem;
  RecallLayout layout = recall_layout(RecallOptions{4, 4, 1, 1}, 32, &problem);
  ASSERT_EQ(problem, "");
  ASSERT_EQ(layout.tokens(), static_cast<int64_t>(text.size()));
  std::vector<int64_t> in, tg(32, kIgnoreTarget);
  for (size_t i = 0; i < 32; ++i) in.push_back(text[i]);
  for (int64_t q = 0; q < 4; ++q) tg[static_cast<size_t>((4 + q) * 4 + 2)] = text[static_cast<size_t>((4 + q) * 4 + 3)];
  Tensor inputs = Tensor::from_vector(in, {1, 32}), targets = Tensor::from_vector(tg, {1, 32});
  RecallBreakdown r;
  add_recall_breakdown(r, Tensor::zeros({1, 32, 257}), inputs, targets, layout);
  EXPECT_DOUBLE_EQ(r.no_lookup, 2.5);
  EXPECT_EQ(r.by_query[1].total, 1);
  EXPECT_EQ(r.by_pair[0].total, 1);  // a is pair 0, queried second
  EXPECT_EQ(r.by_query[1].correct, 0);  // argmax of zero logits is token 0

  // Drawn with replacement, answers narrow nothing: the guess is always 1 (2 of
  // the 4 pairs), right at the queries of a and b: 2 of 4. Repeated keys allowed.
  layout = recall_layout(RecallOptions{4, 4, 1, 1, "replace"}, 32, &problem);
  ASSERT_EQ(problem, "");
  RecallBreakdown rr;
  add_recall_breakdown(rr, Tensor::zeros({1, 32, 257}), inputs, targets, layout);
  EXPECT_DOUBLE_EQ(rr.no_lookup, 2.0);
  const std::string repeats = "a:1 b:1 c:2 d:3 |c:2 c:2 d:3 b:1 ";  // 1 right of 4
  for (size_t i = 0; i < 32; ++i) in[i] = repeats[i];
  for (int64_t q = 0; q < 4; ++q)
    tg[static_cast<size_t>((4 + q) * 4 + 2)] = repeats[static_cast<size_t>((4 + q) * 4 + 3)];
  RecallBreakdown rep;
  add_recall_breakdown(rep, Tensor::zeros({1, 32, 257}), Tensor::from_vector(in, {1, 32}),
                       Tensor::from_vector(tg, {1, 32}), layout);
  EXPECT_DOUBLE_EQ(rep.no_lookup, 1.0);
  EXPECT_EQ(rep.by_pair[2].total, 2);  // c asked twice
  EXPECT_EQ(rep.by_pair[0].total, 0);
}

TEST(Tasks, EvalResultJsonAndTable) {
  TaskEvalResult r;
  r.task = "needle";
  r.by_length[64] = {3, 4};
  r.by_length[128] = {1, 4};
  r.by_depth["0.1"] = {4, 4};
  r.by_depth["0.9"] = {0, 4};
  r.by_cell[64]["0.1"] = {2, 2};
  r.by_cell[64]["0.9"] = {1, 2};
  r.by_cell[128]["0.1"] = {2, 2};
  r.by_cell[128]["0.9"] = {0, 2};
  nlohmann::json j = r.to_json();
  EXPECT_EQ(j["task"], "needle");
  EXPECT_DOUBLE_EQ(j["accuracy"]["64"].get<double>(), 0.75);
  EXPECT_DOUBLE_EQ(j["depth_accuracy"]["0.9"].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(j["length_depth_accuracy"]["64"]["0.9"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(r.mean_accuracy(), 0.5);
  EXPECT_NE(r.table().find("0.500"), std::string::npos) << r.table();
  TaskEvalResult recall;
  recall.task = "recall";
  recall.by_length[32] = {1, 2};
  EXPECT_FALSE(recall.to_json().contains("depth_accuracy"));
  recall.recall_by_length[32].by_query = {{1, 1}, {0, 1}};
  recall.recall_by_length[32].by_pair = {{0, 1}, {1, 1}};
  EXPECT_DOUBLE_EQ(recall.to_json()["query_accuracy"]["32"][1].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(recall.to_json()["pair_accuracy"]["32"][1].get<double>(), 1.0);
  EXPECT_NE(recall.table().find("by query: 1.00 0.00"), std::string::npos) << recall.table();
}

TEST(Tasks, ConfigKeysAndErrorsNameTheValues) {
  RunConfig c = load_config_from_string("data:\n  task: recall\n  recall:\n    key_len: 1\n", "r.yaml",
                                        {"train.eval_lengths=[\"64\", \"128\"]", "data.seq_len=64",
                                         "model.max_seq_len=128"});
  EXPECT_EQ(c.data.task, "recall");
  EXPECT_EQ(c.data.recall.key_len, 1);
  EXPECT_EQ(c.train.eval_lengths, (std::vector<std::string>{"64", "128"}));
  EXPECT_EQ(RunConfig{}.data.task, "text");
  EXPECT_EQ(RunConfig{}.data.needle.depths, (std::vector<std::string>{"0.1", "0.5", "0.9"}));

  auto load_error = [](std::vector<std::string> overrides) {
    return error_of([&] { load_config_from_string("", "t.yaml", overrides); });
  };
  std::string e = load_error({"data.task=recall", "data.seq_len=64", "data.recall.pairs=20"});
  EXPECT_NE(e.find("data.recall.pairs = 20"), std::string::npos) << e;
  EXPECT_NE(e.find("data.seq_len = 64"), std::string::npos) << e;
  e = load_error({"data.task=recall", "data.seq_len=64", "train.eval_lengths=[\"8\"]"});
  EXPECT_NE(e.find("train.eval_lengths entry 8"), std::string::npos) << e;
  e = load_error({"data.task=recall", "train.eval_lengths=[\"4096\"]"});
  EXPECT_NE(e.find("exceeds model.max_seq_len = 2048"), std::string::npos) << e;
  e = load_error({"data.task=recall", "train.eval_lengths=[\"abc\"]"});
  EXPECT_NE(e.find("train.eval_lengths"), std::string::npos) << e;
  EXPECT_NE(e.find("whole numbers"), std::string::npos) << e;
  e = load_error({"data.task=needle", "data.needle.depths=[\"0.5\", \"1.5\"]"});
  EXPECT_NE(e.find("data.needle.depths"), std::string::npos) << e;
  EXPECT_NE(e.find("1.5"), std::string::npos) << e;
  e = load_error({"data.task=needle", "data.seq_len=32"});
  EXPECT_NE(e.find("data.task = needle at data.seq_len = 32"), std::string::npos) << e;
  e = load_error({"data.task=copy"});
  EXPECT_NE(e.find("data.task"), std::string::npos) << e;
  e = load_error({"data.task=recall", "model.vocab_size=100"});
  EXPECT_NE(e.find("model.vocab_size = 100"), std::string::npos) << e;
  EXPECT_EQ(needle_depths({"0", "0.25", "1"}), (std::vector<double>{0.0, 0.25, 1.0}));
  EXPECT_NE(error_of([] { needle_depths({"x"}); }).find("\"x\""), std::string::npos);
}

}  // namespace
}  // namespace loom
