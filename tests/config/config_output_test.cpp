// The start-up table, the key reference, and config.yaml: written atomically,
// and loading it back gives the same config.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/error.h"

namespace loom {
namespace {

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::filesystem::path temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("loom_config_output_test_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  return dir;
}

// A config far from the defaults, with strings YAML could misread.
RunConfig unusual_config() {
  RunConfig c = load_config("", {"model.d_model=96", "model.n_heads=6", "model.n_kv_heads=2", "optim.lr=1e-2"});
  c.model.norm_eps = 1e-6;
  c.model.rope_theta = 500000.0;
  c.model.init_std = 0.1 + 0.2;  // not exactly representable in short decimal
  c.model.tie_embeddings = false;
  c.data.train = "/data/fineweb/*_train_*.bin";
  c.data.text = "";
  c.train.prompt = "She said: \"yes\" # not a comment\n\tand left \\ é";
  c.train.resume = "no";
  c.train.device = "cuda:3";
  c.train.dtype = "bf16";
  c.optim.min_lr = 0.0;
  c.optim.schedule = "wsd";
  c.log.name = "123";
  c.log.progress = "off";
  c.checkpoint.dir = "null";
  return c;
}

TEST(ConfigOutput, TableHasEveryKeyAlignedAndMarksChanges) {
  RunConfig config = load_config("", {"train.steps=10", "log.name=demo"});
  std::string table = config_table(config);
  std::vector<std::string> lines = lines_of(table);
  ASSERT_EQ(lines.size(), config_schema().keys().size() + 2);  // header, rows, footer
  size_t doc_column = lines[0].find("doc");
  size_t value_column = lines[0].find("value");
  for (size_t i = 0; i < config_schema().keys().size(); ++i) {
    const ConfigKey& key = config_schema().keys()[i];
    const std::string& line = lines[i + 1];
    EXPECT_EQ(line.find(key.name()), 2u) << line;
    EXPECT_EQ(line.find(key.doc()), doc_column) << line;
    EXPECT_NE(line[value_column], ' ') << line;
  }
  EXPECT_NE(table.find("* train.steps"), std::string::npos) << table;
  EXPECT_NE(table.find("* log.name"), std::string::npos) << table;
  EXPECT_NE(table.find("  train.seed"), std::string::npos) << table;
  EXPECT_NE(table.find("optimizer steps to run"), std::string::npos);
  EXPECT_NE(table.find(" 10 "), std::string::npos);
  EXPECT_NE(table.find("demo"), std::string::npos);
}

TEST(ConfigOutput, ReferenceListsTypesAndDefaults) {
  std::string reference = config_reference();
  EXPECT_NE(reference.find("enum: f32 | bf16"), std::string::npos) << reference;
  EXPECT_NE(reference.find("int >= 1"), std::string::npos);
  EXPECT_NE(reference.find("default 200"), std::string::npos);
  EXPECT_NE(reference.find("string of letters S"), std::string::npos);
}

TEST(ConfigOutput, YamlIsNestedWithDocs) {
  std::string yaml = to_yaml(load_config("", {}));
  EXPECT_NE(yaml.find("model:\n  vocab_size: 257"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  # optimizer steps to run"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  lr: 0.003"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  rope_theta: 10000.0"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  norm_eps: 1.0e-05"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  layers: \"S\""), std::string::npos) << yaml;
}

TEST(ConfigOutput, WriteResolvedThenReloadIsEqual) {
  auto dir = temp_dir("roundtrip");
  for (const RunConfig& config : {load_config("", {}), unusual_config()}) {
    std::string path = (dir / config.log.name / "config.yaml").string();
    write_resolved(config, path);  // creates the directories
    RunConfig reloaded = load_config(path, {});
    EXPECT_EQ(reloaded, config) << to_yaml(config) << "\nreloaded:\n" << to_yaml(reloaded);
    write_resolved(config, path);  // replaces an existing file
    EXPECT_EQ(load_config(path, {}), config);
    // Only config.yaml is left: the temp file was renamed.
    std::vector<std::string> files;
    for (const auto& entry : std::filesystem::directory_iterator(dir / config.log.name)) {
      files.push_back(entry.path().filename().string());
    }
    EXPECT_EQ(files, std::vector<std::string>{"config.yaml"});
  }
  std::filesystem::remove_all(dir.parent_path());
}

TEST(ConfigOutput, WriteResolvedToAnUnwritablePlaceFails) {
  auto dir = temp_dir("blocked");
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "file") << "x";
  EXPECT_THROW(write_resolved(RunConfig{}, (dir / "file" / "config.yaml").string()), Error);
  std::filesystem::remove_all(dir.parent_path());
}

// A schema with a string-list key and a nested section, as later features add.
std::vector<std::string>& extra_list(RunConfig&) {
  static std::vector<std::string> list{"a"};
  return list;
}

TEST(ConfigOutput, StringListsAndNestedSectionsRoundTrip) {
  ConfigSchema schema = config_schema();
  schema.add("data.extra.files", &extra_list, "extra files").non_empty();
  RunConfig config = load_config("", {"data.extra.files=[x.bin, \"y z.bin\"]"}, schema);
  RunConfig scratch;
  EXPECT_EQ(extra_list(scratch), (std::vector<std::string>{"x.bin", "y z.bin"}));
  std::string yaml = to_yaml(config, schema);
  EXPECT_NE(yaml.find("  extra:\n    files: [\"x.bin\", \"y z.bin\"]"), std::string::npos) << yaml;
  extra_list(scratch) = {"other"};
  load_config_from_string(yaml, "resolved.yaml", {}, schema);
  EXPECT_EQ(extra_list(scratch), (std::vector<std::string>{"x.bin", "y z.bin"}));
  load_config("", {"data.extra.files=single.bin"}, schema);
  EXPECT_EQ(extra_list(scratch), std::vector<std::string>{"single.bin"});
  EXPECT_THROW(load_config("", {"data.extra.files=[]"}, schema), Error);
  EXPECT_THROW(load_config("", {"data.extra=5"}, schema), Error);
}

}  // namespace
}  // namespace loom
