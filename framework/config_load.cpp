// Loading a RunConfig: defaults, then the YAML recipe, then `section.key=value`
// overrides, then derived defaults and validation. Every error names the key,
// the value as written, what is allowed, and where it came from.
#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "framework/config.h"
#include "framework/error.h"

namespace loom {
namespace {

std::string trim(const std::string& s) {
  size_t begin = s.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  size_t end = s.find_last_not_of(" \t\r\n");
  return s.substr(begin, end - begin + 1);
}

std::string join(const std::vector<std::string>& items, const char* separator) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? separator : "") + items[i];
  return out;
}

std::string kind_of(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Scalar: return "a value";
    default: return "nothing";
  }
}

// The value as written, for messages: "\"abc\"", or "<a mapping>".
std::string shown(const YAML::Node& node) {
  if (node.IsScalar()) return format_config_value(node.Scalar(), true);
  return fmt::format("<{}>", kind_of(node));
}

// "a value \"5\"", "a list": what was found where something else was expected.
std::string found(const YAML::Node& node) {
  return node.IsScalar() ? kind_of(node) + " " + shown(node) : kind_of(node);
}

// Where values come from: a recipe (file:line of each key) or one override.
struct Source {
  std::string file;           // recipe name, when from a recipe
  std::string override_text;  // the override as given, when from one
  std::string at(const YAML::Node& key) const {
    if (!override_text.empty()) return fmt::format("override \"{}\"", override_text);
    if (key.Mark().is_null()) return file;
    return fmt::format("{}:{}", file, key.Mark().line + 1);
  }
};

bool parse_int(const std::string& text, int64_t& out) {
  const char* begin = text.data();
  const char* end = begin + text.size();
  if (begin != end && *begin == '+') ++begin;
  auto [ptr, ec] = std::from_chars(begin, end, out);
  return ec == std::errc() && ptr == end && begin != end;
}

bool parse_real(const std::string& text, double& out) {
  const char* begin = text.data();
  const char* end = begin + text.size();
  if (begin != end && *begin == '+') ++begin;
  auto [ptr, ec] = std::from_chars(begin, end, out);
  return ec == std::errc() && ptr == end && begin != end && std::isfinite(out);
}

bool parse_bool(const std::string& text, bool& out) {
  std::string lower;
  for (char ch : text) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (lower == "true" || lower == "yes" || lower == "on") return out = true, true;
  if (lower == "false" || lower == "no" || lower == "off") return out = false, true;
  return false;
}

// Converts a YAML value to the key's type and checks the key's constraints.
ConfigValue parse_value(const ConfigKey& key, const YAML::Node& node, const std::string& where) {
  auto fail = [&](const std::string& problem) {
    LOOM_FAIL() << where << ": " << key.name() << " = " << shown(node) << ": " << problem;
  };
  auto wrong_type = [&](const std::string& expected) {
    fail("wrong type: expected " + expected + " (allowed: " + key.allowed_text() + ")");
  };
  ConfigValue value;
  switch (key.type()) {
    case KeyType::integer: {
      int64_t v = 0;
      if (!node.IsScalar() || !parse_int(node.Scalar(), v)) wrong_type("an integer");
      value = v;
      break;
    }
    case KeyType::real: {
      double v = 0;
      if (!node.IsScalar() || !parse_real(node.Scalar(), v)) wrong_type("a finite number");
      value = v;
      break;
    }
    case KeyType::boolean: {
      bool v = false;
      if (!node.IsScalar() || !parse_bool(node.Scalar(), v)) wrong_type("true or false");
      value = v;
      break;
    }
    case KeyType::string:
    case KeyType::choice:
      if (node.IsNull()) {
        value = std::string();
      } else if (node.IsScalar()) {
        value = node.Scalar();
      } else {
        wrong_type("a string");
      }
      break;
    case KeyType::string_list: {
      std::vector<std::string> items;
      if (node.IsScalar()) {
        items.push_back(node.Scalar());
      } else if (node.IsSequence()) {
        for (const auto& item : node) {
          if (!item.IsScalar()) wrong_type("a list of strings");
          items.push_back(item.Scalar());
        }
      } else if (!node.IsNull()) {
        wrong_type("a list of strings");
      }
      value = std::move(items);
      break;
    }
  }
  std::string problem = key.violation(value);
  if (!problem.empty()) {
    LOOM_FAIL() << where << ": " << key.name() << " = " << format_config_value(value, true) << ": " << problem;
  }
  return value;
}

void apply_map(const ConfigSchema& schema, RunConfig& config, const std::string& prefix, const YAML::Node& map,
               const Source& source, std::map<std::string, std::string>* seen);

// Sets the key (or, for a section, the keys of the mapping) `name` from `value`.
// `seen` (recipes only) catches a key given twice in one file.
void apply_entry(const ConfigSchema& schema, RunConfig& config, const std::string& name, const YAML::Node& value,
                 const std::string& where, const Source& source, std::map<std::string, std::string>* seen) {
  if (const ConfigKey* key = schema.find(name)) {
    if (seen != nullptr) {
      auto [it, inserted] = seen->emplace(name, where);
      if (!inserted) LOOM_FAIL() << where << ": " << name << " is set twice (first at " << it->second << ")";
    }
    key->set(config, parse_value(*key, value, where));
    return;
  }
  if (schema.is_section(name)) {
    if (value.IsNull()) return;  // an empty section
    if (!value.IsMap())
      LOOM_FAIL() << where << ": " << name << " is a section, so it needs a mapping of keys (" << name
                  << ".<key>: value), got " << found(value);
    apply_map(schema, config, name, value, source, seen);
    return;
  }
  bool top = name.find('.') == std::string::npos;
  std::string suggestion = schema.suggest(name);
  LOOM_FAIL() << where << ": unknown " << (top ? "section" : "key") << " \"" << name << "\""
              << (suggestion.empty() ? "" : " (did you mean \"" + suggestion + "\"?)")
              << (top ? "; sections: " + join(schema.top_sections(), ", ") : "");
}

void apply_map(const ConfigSchema& schema, RunConfig& config, const std::string& prefix, const YAML::Node& map,
               const Source& source, std::map<std::string, std::string>* seen) {
  for (const auto& entry : map) {
    std::string where = source.at(entry.first);
    if (!entry.first.IsScalar())
      LOOM_FAIL() << where << ": keys are plain names, got " << kind_of(entry.first)
                  << (prefix.empty() ? "" : " in " + prefix);
    std::string name = prefix.empty() ? entry.first.Scalar() : prefix + "." + entry.first.Scalar();
    apply_entry(schema, config, name, entry.second, where, source, seen);
  }
}

void apply_override(const ConfigSchema& schema, RunConfig& config, const std::string& text) {
  Source source{"", text};
  std::string where = source.at(YAML::Node());
  size_t eq = text.find('=');
  if (eq == std::string::npos || trim(text.substr(0, eq)).empty())
    LOOM_FAIL() << where << ": expected section.key=value (e.g. train.steps=100)";
  std::string name = trim(text.substr(0, eq));
  std::string raw = trim(text.substr(eq + 1));
  // A string value is taken as written ("*.bin", "The #1 hacker", "a: b" are not
  // plain YAML scalars) unless it is quoted; everything else is parsed as YAML.
  const ConfigKey* key = schema.find(name);
  bool literal = key != nullptr && (key->type() == KeyType::string || key->type() == KeyType::choice) &&
                 (raw.empty() || (raw.front() != '"' && raw.front() != '\''));
  YAML::Node value;
  if (literal) {
    value = YAML::Node(raw);
  } else {
    try {
      value = YAML::Load(raw);
    } catch (const YAML::Exception& e) {
      LOOM_FAIL() << where << ": the value of " << name << " is not valid YAML (" << e.msg << ")";
    }
  }
  apply_entry(schema, config, name, value, where, source, nullptr);
}

void check_config(const RunConfig& config, const ConfigSchema& schema, const std::string& origin) {
  std::vector<std::string> problems = schema.problems(config);
  if (!problems.empty()) LOOM_FAIL() << "invalid config" << origin << ": " << join(problems, "; ");
}

RunConfig load(const std::string& yaml, const std::string& source_name, const std::string& default_name,
               const std::vector<std::string>& overrides, const ConfigSchema& schema) {
  std::string name = source_name.empty() ? "<recipe>" : source_name;
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    if (e.mark.is_null()) LOOM_FAIL() << "malformed YAML in " << name << ": " << e.msg;
    LOOM_FAIL() << "malformed YAML in " << name << " at line " << e.mark.line + 1 << ", column " << e.mark.column + 1
                << ": " << e.msg;
  }
  RunConfig config;
  if (!root.IsNull()) {
    if (!root.IsMap())
      LOOM_FAIL() << name << ": a recipe is a mapping of sections (" << join(schema.top_sections(), ", ") << "), got "
                  << found(root);
    std::map<std::string, std::string> seen;
    apply_map(schema, config, "", root, Source{name, ""}, &seen);
  }
  for (const auto& text : overrides) apply_override(schema, config, text);
  if (config.log.name.empty()) config.log.name = default_name;

  std::string origin;
  if (!source_name.empty())
    origin = " (" + source_name + (overrides.empty() ? ")" : " with overrides)");
  else if (!overrides.empty())
    origin = " (defaults with overrides)";
  check_config(config, schema, origin);
  return config;
}

}  // namespace

RunConfig load_config(const std::string& recipe_path, const std::vector<std::string>& overrides,
                      const ConfigSchema& schema) {
  if (recipe_path.empty()) return load("", "", "default", overrides, schema);
  std::filesystem::path path(recipe_path);
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) LOOM_FAIL() << "recipe file not found: " << recipe_path;
  if (std::filesystem::is_directory(path, ec))
    LOOM_FAIL() << "recipe path is a directory, not a YAML file: " << recipe_path;
  std::ifstream in(path, std::ios::binary);
  if (!in) LOOM_FAIL() << "cannot read recipe file " << recipe_path;
  std::stringstream text;
  text << in.rdbuf();
  std::string stem = path.stem().string();
  return load(text.str(), recipe_path, stem.empty() ? "default" : stem, overrides, schema);
}

RunConfig load_config_from_string(const std::string& yaml, const std::string& source_name,
                                  const std::vector<std::string>& overrides, const ConfigSchema& schema) {
  std::filesystem::path path(source_name);
  std::string default_name = "default";
  if ((path.extension() == ".yaml" || path.extension() == ".yml") && !path.stem().empty()) {
    default_name = path.stem().string();
  }
  return load(yaml, source_name, default_name, overrides, schema);
}

void validate_config(const RunConfig& config, const ConfigSchema& schema) { check_config(config, schema, ""); }

}  // namespace loom
