// Showing and saving a RunConfig: the start-up table, the key reference, and
// config.yaml (a complete recipe: loading it gives the same config back).
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "framework/config.h"
#include "framework/file_io.h"
#include "framework/error.h"

namespace loom {
namespace {

// Widest entry of a column, capped so one long path does not push every doc off screen.
size_t column_width(const std::vector<std::string>& cells, size_t cap) {
  size_t width = 0;
  for (const auto& cell : cells) width = std::max(width, cell.size());
  return std::min(width, cap);
}

// Lines of the YAML block for the keys under `prefix` ("" = top level), nested
// by dotted name, in registration order, each key with its doc as a comment.
void emit_block(std::string& out, const RunConfig& config, const ConfigSchema& schema, const std::string& prefix,
                size_t indent) {
  struct Line {
    std::string child;
    const ConfigKey* key;  // nullptr for a nested section
  };
  std::vector<Line> lines;
  for (const auto& key : schema.keys()) {
    const std::string& name = key.name();
    if (!prefix.empty() && name.compare(0, prefix.size() + 1, prefix + ".") != 0) continue;
    std::string rest = prefix.empty() ? name : name.substr(prefix.size() + 1);
    size_t dot = rest.find('.');
    std::string child = rest.substr(0, dot);
    bool seen = std::any_of(lines.begin(), lines.end(), [&](const Line& l) { return l.child == child; });
    if (!seen) lines.push_back({child, dot == std::string::npos ? &key : nullptr});
  }
  std::vector<std::string> heads;
  for (const auto& line : lines) {
    if (line.key != nullptr) {
      heads.push_back(fmt::format("{}{}: {}", std::string(indent, ' '), line.child,
                                  format_config_value(line.key->get(config), true)));
    } else {
      heads.push_back("");
    }
  }
  size_t width = column_width(heads, 60);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].key != nullptr) {
      out += fmt::format("{:<{}}  # {}\n", heads[i], width, lines[i].key->doc());
      continue;
    }
    if (indent == 0 && i > 0) out += "\n";
    out += fmt::format("{}{}:\n", std::string(indent, ' '), lines[i].child);
    emit_block(out, config, schema, prefix.empty() ? lines[i].child : prefix + "." + lines[i].child, indent + 2);
  }
}

}  // namespace

std::string config_table(const RunConfig& config, const ConfigSchema& schema) {
  std::vector<std::string> names{"key"}, values{"value"}, docs{"doc"}, marks{" "};
  for (const auto& key : schema.keys()) {
    ConfigValue value = key.get(config);
    names.push_back(key.name());
    values.push_back(format_config_value(value, false));
    docs.push_back(key.doc());
    marks.push_back(value == key.default_value() ? " " : "*");
  }
  size_t name_width = column_width(names, 64);
  size_t value_width = column_width(values, 40);
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    out += fmt::format("{} {:<{}}  {:<{}}  {}\n", marks[i], names[i], name_width, values[i], value_width, docs[i]);
  }
  out += "(* = differs from the default)\n";
  return out;
}

std::string config_reference(const ConfigSchema& schema) {
  std::vector<std::string> names, kinds, defaults;
  for (const auto& key : schema.keys()) {
    names.push_back(key.name());
    kinds.push_back(key.allowed_text());
    defaults.push_back(format_config_value(key.default_value(), true));
  }
  size_t name_width = column_width(names, 64);
  size_t kind_width = column_width(kinds, 40);
  size_t default_width = column_width(defaults, 24);
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    out += fmt::format("{:<{}}  {:<{}}  default {:<{}}  {}\n", names[i], name_width, kinds[i], kind_width, defaults[i],
                       default_width, schema.keys()[i].doc());
  }
  return out;
}

std::string to_yaml(const RunConfig& config, const ConfigSchema& schema) {
  std::string out =
      "# Resolved loom config: every key after defaults, recipe and overrides.\n"
      "# It is a complete recipe: training with it reproduces this configuration.\n";
  emit_block(out, config, schema, "", 0);
  return out;
}

void write_resolved(const RunConfig& config, const std::string& path, const ConfigSchema& schema) {
  namespace fs = std::filesystem;
  std::string text = to_yaml(config, schema);
  write_file_atomic(fs::path(path), text);  // readers see the old file or the whole new one
}

}  // namespace loom
