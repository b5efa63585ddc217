// Recipes and overrides: defaults, typed loading, override precedence, and one
// test per error class checking that the message names the key, the value,
// what is allowed and where the value came from.
#include "framework/config.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "framework/error.h"
#include "tests/testing.h"

namespace loom {
namespace {

// Passes when `fn` throws loom::Error whose message contains every piece.
template <typename Fn>
::testing::AssertionResult throws_with(Fn&& fn, const std::vector<std::string>& pieces) {
  try {
    fn();
  } catch (const Error& e) {
    std::string message = e.what();
    for (const auto& piece : pieces) {
      if (message.find(piece) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks \"" << piece << "\": " << message;
      }
    }
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no loom::Error thrown";
}
#define EXPECT_CONFIG_ERROR(expr, ...) EXPECT_TRUE(throws_with([&] { (void)(expr); }, __VA_ARGS__))

RunConfig from_string(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return load_config_from_string(yaml, "recipe.yaml", overrides);
}

RunConfig from_overrides(const std::vector<std::string>& overrides) { return load_config("", overrides); }

// A fresh folder `name` under this process's temporary folder (removed at exit).
std::filesystem::path temp_dir(const std::string& name) {
  static const testing::TempDir root("loom_config_test");
  auto dir = root.path() / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

TEST(Config, DefaultsAreTheFieldInitializers) {
  RunConfig config = load_config("", {});
  RunConfig expected;
  expected.log.name = "default";
  EXPECT_EQ(config, expected);
  EXPECT_EQ(config.model.vocab_size, 257);
  EXPECT_EQ(config.model.layers, "S");
  EXPECT_EQ(config.model.ffn, "dense");
  EXPECT_EQ(config.train.steps, 200);
  EXPECT_EQ(config.train.dtype, "f32");
  EXPECT_DOUBLE_EQ(config.optim.lr, 3e-3);
  EXPECT_EQ(config.optim.schedule, "cosine");
  EXPECT_EQ(config.parallel.layout, "zigzag");
  EXPECT_EQ(config.log.dir, "runs");
  // Zeros resolved: kv heads = heads, head dim = C / H, SwiGLU width 8/3 C up to a multiple of 64.
  EXPECT_EQ(config.model.effective_n_kv_heads(), 4);
  EXPECT_EQ(config.model.effective_head_dim(), 32);
  EXPECT_EQ(config.model.effective_ffn_hidden(), 384);
  EXPECT_EQ(config.model.layer_types(), "SSSS");
  EXPECT_EQ(config.run_dir(), "runs/default");
  EXPECT_EQ(config.checkpoint_dir(), "runs/default/checkpoints");
  EXPECT_EQ(config.config_path(), "runs/default/config.yaml");
}

TEST(Config, SchemaIsComplete) {
  const ConfigSchema& schema = config_schema();
  EXPECT_EQ(schema.top_sections(),
            (std::vector<std::string>{"model", "data", "train", "optim", "parallel", "checkpoint", "log"}));
  EXPECT_TRUE(schema.problems(RunConfig{}).empty());
  for (const auto& key : schema.keys()) {
    EXPECT_FALSE(key.doc().empty()) << key.name();
    EXPECT_EQ(key.get(RunConfig{}), key.default_value()) << key.name();
  }
  EXPECT_EQ(schema.key("train.steps").type(), KeyType::integer);
  EXPECT_EQ(schema.key("optim.lr").type(), KeyType::real);
  EXPECT_EQ(schema.key("model.tie_embeddings").type(), KeyType::boolean);
  EXPECT_EQ(schema.key("train.prompt").type(), KeyType::string);
  EXPECT_EQ(schema.key("optim.schedule").type(), KeyType::choice);
  EXPECT_EQ(schema.key("optim.schedule").allowed_values(),
            (std::vector<std::string>{"constant", "cosine", "linear", "wsd"}));
}

TEST(Config, LoadsARecipe) {
  RunConfig config = load_config_from_string(R"(
# a small hybrid-free recipe
model:
  d_model: 64
  n_heads: 8
  n_kv_heads: 2
  tie_embeddings: no
  norm_eps: 1.0e-6
data:
  text: jargon.txt
train:
  steps: 50
  device: cuda:1
  dtype: bf16
  prompt: "Hello: world"
optim:
  lr: 0.01
  schedule: wsd
parallel:
  layout: contiguous
log:
  progress: off
checkpoint:
)",
                                             "launch/recipes/tiny.yaml", {});
  EXPECT_EQ(config.model.d_model, 64);
  EXPECT_EQ(config.model.n_heads, 8);
  EXPECT_EQ(config.model.effective_n_kv_heads(), 2);
  EXPECT_EQ(config.model.effective_head_dim(), 8);
  EXPECT_FALSE(config.model.tie_embeddings);
  EXPECT_DOUBLE_EQ(config.model.norm_eps, 1e-6);
  EXPECT_EQ(config.data.text, "jargon.txt");
  EXPECT_EQ(config.train.steps, 50);
  EXPECT_EQ(config.train.device, "cuda:1");
  EXPECT_EQ(config.train.dtype, "bf16");
  EXPECT_EQ(config.train.prompt, "Hello: world");
  EXPECT_DOUBLE_EQ(config.optim.lr, 0.01);
  EXPECT_EQ(config.optim.schedule, "wsd");
  EXPECT_EQ(config.parallel.layout, "contiguous");
  EXPECT_EQ(config.log.progress, "off");  // a YAML 1.1 bool word, taken as the enum value
  EXPECT_EQ(config.log.name, "tiny");     // the source's file stem
  EXPECT_EQ(config.model.n_layers, 4);    // untouched keys keep their defaults
  EXPECT_EQ(config.checkpoint.every, 100);
}

TEST(Config, LoadsARecipeFile) {
  auto dir = temp_dir("file");
  std::ofstream(dir / "my-run.yaml") << "train:\n  steps: 7\n";
  RunConfig config = load_config((dir / "my-run.yaml").string(), {"train.seed=9"});
  EXPECT_EQ(config.train.steps, 7);
  EXPECT_EQ(config.train.seed, 9);
  EXPECT_EQ(config.log.name, "my-run");
  std::filesystem::remove_all(dir);
}

TEST(Config, EmptyRecipesGiveDefaults) {
  RunConfig expected;
  expected.log.name = "default";
  for (const char* yaml : {"", "\n", "# nothing but a comment\n", "---\n", "model:\ntrain: ~\n"}) {
    EXPECT_EQ(load_config_from_string(yaml, "<embedded>", {}), expected) << "recipe: " << yaml;
  }
}

TEST(Config, OverridesAreTypedAndLaterOnesWin) {
  RunConfig config = from_string(
      "train:\n  steps: 50\n  seed: 3\n",
      {"train.steps=10", "optim.lr=1e-2", "model.tie_embeddings=false", "log.name=my run", "model.layers=\"SS\"",
       "data.train=*.bin", "train.seed=4", "train.seed = 5", "train.prompt=", "optim={beta1: 0.8, zero: true}",
       "data.val=The #1 data: here", "data.text='quoted: yes'"});
  EXPECT_EQ(config.train.steps, 10);  // the override beats the recipe
  EXPECT_DOUBLE_EQ(config.optim.lr, 1e-2);
  EXPECT_FALSE(config.model.tie_embeddings);
  EXPECT_EQ(config.log.name, "my run");
  EXPECT_EQ(config.model.layers, "SS");
  EXPECT_EQ(config.data.train, "*.bin");  // not valid YAML (an alias)
  EXPECT_EQ(config.train.seed, 5);        // the last of three
  EXPECT_EQ(config.train.prompt, "");
  EXPECT_EQ(config.data.val, "The #1 data: here");  // unquoted strings are taken as written
  EXPECT_EQ(config.data.text, "quoted: yes");       // quoted ones are YAML
  EXPECT_DOUBLE_EQ(config.optim.beta1, 0.8);        // a whole section as a YAML mapping
  EXPECT_TRUE(config.optim.zero);
}

TEST(Config, UnknownKeysSuggestTheClosest) {
  EXPECT_CONFIG_ERROR(from_string("train:\n  steps: 5\n  stpes: 10\n"),
                      {"recipe.yaml:3", "unknown key \"train.stpes\"", "did you mean \"train.steps\""});
  EXPECT_CONFIG_ERROR(from_string("trian:\n  steps: 5\n"),
                      {"recipe.yaml:1", "unknown section \"trian\"", "did you mean \"train\"", "model, data, train"});
  EXPECT_CONFIG_ERROR(from_overrides({"train.lr=0.1"}),
                      {"override \"train.lr=0.1\"", "unknown key \"train.lr\"", "did you mean \"optim.lr\""});
  EXPECT_CONFIG_ERROR(from_overrides({"model.d_modle=3"}), {"did you mean \"model.d_model\""});
  EXPECT_CONFIG_ERROR(from_overrides({"model.completely_different=3"}), {"unknown key \"model.completely_different\""});
}

TEST(Config, WrongTypesNameKeyValueAndType) {
  EXPECT_CONFIG_ERROR(from_string("train:\n  steps: abc\n"),
                      {"recipe.yaml:2", "train.steps = \"abc\"", "expected an integer", "int >= 1"});
  EXPECT_CONFIG_ERROR(from_overrides({"train.steps=1.5"}),
                      {"override \"train.steps=1.5\"", "train.steps = \"1.5\"", "expected an integer"});
  EXPECT_CONFIG_ERROR(from_string("model:\n  tie_embeddings: maybe\n"),
                      {"recipe.yaml:2", "model.tie_embeddings = \"maybe\"", "true or false"});
  EXPECT_CONFIG_ERROR(from_overrides({"optim.lr=fast"}), {"optim.lr = \"fast\"", "expected a finite number"});
  EXPECT_CONFIG_ERROR(from_overrides({"optim.lr=.inf"}), {"optim.lr", "expected a finite number"});
  EXPECT_CONFIG_ERROR(from_string("train:\n  steps: {a: 1}\n"), {"train.steps = <a mapping>", "expected an integer"});
  EXPECT_CONFIG_ERROR(from_string("train:\n  prompt: [a, b]\n"), {"train.prompt = <a list>", "expected a string"});
  EXPECT_CONFIG_ERROR(from_overrides({"train.steps="}), {"train.steps", "expected an integer"});
  EXPECT_CONFIG_ERROR(from_overrides({"train.steps=[1"}), {"train.steps", "not valid YAML"});
  EXPECT_CONFIG_ERROR(from_overrides({"train.prompt=\"open"}), {"train.prompt", "not valid YAML"});
}

TEST(Config, OutOfRangeNamesTheAllowedRange) {
  EXPECT_CONFIG_ERROR(from_overrides({"train.steps=0"}),
                      {"override \"train.steps=0\"", "train.steps = 0", "out of range", "int >= 1"});
  EXPECT_CONFIG_ERROR(from_string("optim:\n  beta2: 1.0\n"),
                      {"recipe.yaml:2", "optim.beta2 = 1.0", "out of range", "float in [0, 1)"});
  EXPECT_CONFIG_ERROR(from_overrides({"model.vocab_size=1"}), {"model.vocab_size = 1", ">= 2"});
  EXPECT_CONFIG_ERROR(from_overrides({"model.norm_eps=0"}), {"model.norm_eps = 0.0", "float > 0"});
  EXPECT_CONFIG_ERROR(from_overrides({"train.device=gpu"}), {"train.device = \"gpu\"", "cpu, cuda or cuda:N"});
  EXPECT_CONFIG_ERROR(from_overrides({"log.dir="}), {"log.dir = \"\"", "must not be empty"});
  EXPECT_NO_THROW(from_overrides({"train.device=cuda"}));
}

TEST(Config, BadEnumValuesListTheAllowedOnes) {
  EXPECT_CONFIG_ERROR(from_string("train:\n  dtype: f16\n"),
                      {"recipe.yaml:2", "train.dtype = \"f16\"", "allowed: f32, bf16"});
  EXPECT_CONFIG_ERROR(from_overrides({"optim.schedule=step"}), {"allowed: constant, cosine, linear, wsd"});
  EXPECT_CONFIG_ERROR(from_overrides({"model.ffn=mixture"}), {"model.ffn = \"mixture\"", "allowed: dense, moe"});
  EXPECT_CONFIG_ERROR(from_overrides({"model.layers=SXS"}), {"model.layers = \"SXS\"", "letter 'X'", "letters S L"});
  EXPECT_CONFIG_ERROR(from_overrides({"model.S.gate=sometimes"}), {"allowed: none, headwise, elementwise"});
  EXPECT_CONFIG_ERROR(from_overrides({"model.layers="}), {"model.layers = \"\"", "must not be empty"});
  EXPECT_CONFIG_ERROR(from_overrides({"model.attention_backend=cudnn9"}),
                      {"model.attention_backend = \"cudnn9\"", "allowed: auto, native, cudnn, interim"});
  EXPECT_CONFIG_ERROR(from_overrides({"data.recall.draw=sorted"}),
                      {"data.recall.draw = \"sorted\"", "allowed: distinct, replace"});
  EXPECT_EQ(from_overrides({"model.attention_backend=native"}).model.attention_backend, "native");
  EXPECT_EQ(from_overrides({"model.attention_backend=cudnn"}).model.attention_backend, "cudnn");
  EXPECT_EQ(from_overrides({"data.recall.draw=replace"}).data.recall.draw, "replace");
  EXPECT_CONFIG_ERROR(from_overrides({"model.L.short_conv=1"}), {"model.L.short_conv = 1", "0 or a width >= 2"});
  // Under cp each chunk needs short_conv - 1 tokens of the chunk before it.
  EXPECT_CONFIG_ERROR(from_overrides({"model.layers=LS", "model.L.short_conv=4", "parallel.cp=4",
                                      "parallel.layout=zigzag", "data.seq_len=16", "model.max_seq_len=16"}),
                      {"model.L.short_conv = 4", "data.seq_len = 16", "parallel.cp = 4", "gives 2"});
  EXPECT_EQ(from_overrides({"model.layers=LS", "model.L.short_conv=4", "parallel.cp=2", "data.seq_len=16",
                            "model.max_seq_len=16"}).model.L.short_conv, 4);
}

TEST(Config, ExtendedSchemaAcceptsNewLettersAndValues) {
  ConfigSchema schema = config_schema();  // what the model layer does for its mixers
  schema.key("model.layers").letters("Q");
  schema.key("model.ffn").allow("custom");
  RunConfig config = load_config("", {"model.layers=QQLS", "model.ffn=custom"}, schema);
  EXPECT_EQ(config.model.layers, "QQLS");
  EXPECT_EQ(config.model.layer_types(), "QQLS");
  EXPECT_EQ(config.model.ffn, "custom");
  config = load_config("", {"model.layers=QQS", "model.n_layers=5"}, schema);
  EXPECT_EQ(config.model.layer_types(), "QQSQQ");
  // The built-in schema is unchanged.
  EXPECT_CONFIG_ERROR(from_overrides({"model.layers=QQLS"}), {"letter 'Q'"});
}

TEST(Config, MalformedYamlNamesFileAndLine) {
  EXPECT_CONFIG_ERROR(
      load_config_from_string("model:\n  d_model: 64\n  n_heads: [1, 2\ntrain:\n  steps: 3\n", "broken.yaml", {}),
      {"malformed YAML in broken.yaml at line 4"});
  EXPECT_CONFIG_ERROR(load_config_from_string("train:\n  steps: 1: 2\n", "broken.yaml", {}),
                      {"malformed YAML in broken.yaml at line 2"});
}

TEST(Config, MissingRecipeNamesThePath) {
  EXPECT_CONFIG_ERROR(load_config("/nonexistent/dir/recipe.yaml", {}),
                      {"recipe file not found: /nonexistent/dir/recipe.yaml"});
}

TEST(Config, BadOverrideSyntax) {
  EXPECT_CONFIG_ERROR(from_overrides({"train.steps"}), {"override \"train.steps\"", "expected section.key=value"});
  EXPECT_CONFIG_ERROR(from_overrides({"=5"}), {"override \"=5\"", "expected section.key=value"});
  EXPECT_CONFIG_ERROR(from_overrides({"train=5"}), {"train is a section", "got a value \"5\""});
}

TEST(Config, RecipeShapeErrors) {
  EXPECT_CONFIG_ERROR(from_string("train: 5\n"), {"recipe.yaml:1", "train is a section", "got a value \"5\""});
  EXPECT_CONFIG_ERROR(from_string("- model\n- train\n"),
                      {"recipe.yaml", "a recipe is a mapping of sections", "got a list"});
  EXPECT_CONFIG_ERROR(from_string("hello\n"), {"a recipe is a mapping of sections", "got a value \"hello\""});
  EXPECT_CONFIG_ERROR(from_string("train:\n  steps: 5\n  steps: 6\n"),
                      {"recipe.yaml:3", "train.steps is set twice", "first at recipe.yaml:2"});
}

TEST(Config, CrossFieldChecksNameBothValues) {
  EXPECT_CONFIG_ERROR(from_overrides({"model.n_heads=6", "model.n_kv_heads=4"}),
                      {"invalid config", "model.n_heads = 6", "model.n_kv_heads = 4"});
  EXPECT_CONFIG_ERROR(from_string("model:\n  d_model: 100\n  n_heads: 3\n"),
                      {"invalid config (recipe.yaml)", "model.d_model = 100", "model.n_heads = 3"});
  EXPECT_NO_THROW(from_string("model:\n  d_model: 100\n  n_heads: 3\n  head_dim: 32\n"));
  EXPECT_CONFIG_ERROR(from_overrides({"model.d_model=12", "model.n_heads=4"}), {"must be even for RoPE"});
  EXPECT_CONFIG_ERROR(from_overrides({"data.seq_len=4096"}), {"data.seq_len = 4096", "model.max_seq_len = 2048"});
  EXPECT_CONFIG_ERROR(from_overrides({"optim.min_lr=0.1"}), {"optim.min_lr = 0.1", "optim.lr = 0.003"});
  EXPECT_CONFIG_ERROR(from_overrides({"train.dtype=bf16"}), {"train.dtype = bf16", "train.device = cpu"});
  EXPECT_NO_THROW(from_overrides({"train.dtype=bf16", "train.device=cuda:0"}));
  EXPECT_CONFIG_ERROR(from_overrides({"model.layers=SSS", "model.n_layers=2"}),
                      {"model.layers = \"SSS\"", "model.n_layers = 2"});
  // Several problems are reported together.
  EXPECT_CONFIG_ERROR(from_overrides({"data.seq_len=4096", "optim.min_lr=0.1"}), {"data.seq_len", "optim.min_lr"});
}

TEST(Config, ValidateCatchesProgrammaticEdits) {
  RunConfig config;
  EXPECT_NO_THROW(validate_config(config));
  config.train.steps = 0;
  config.model.n_kv_heads = 3;
  EXPECT_CONFIG_ERROR(validate_config(config), {"train.steps = 0: out of range", "model.n_kv_heads = 3"});
}

}  // namespace
}  // namespace loom
