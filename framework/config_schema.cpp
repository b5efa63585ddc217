// The config schema machinery: keys with their constraints, value formatting,
// per-key violations and the closest-name suggestion for unknown keys. The
// built-in keys themselves are registered in config.cpp.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "framework/config.h"
#include "framework/error.h"

namespace loom {

const char* key_type_name(KeyType type) {
  switch (type) {
    case KeyType::integer: return "int";
    case KeyType::real: return "float";
    case KeyType::boolean: return "bool";
    case KeyType::string: return "string";
    case KeyType::choice: return "enum";
    case KeyType::string_list: return "string list";
  }
  return "?";
}

namespace {

// JSON-style double-quoted string, which is also a valid YAML double-quoted scalar.
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (ch < 0x20 || ch == 0x7f) {
          out += fmt::format("\\x{:02x}", ch);
        } else {
          out += static_cast<char>(ch);
        }
    }
  }
  return out + "\"";
}

// Shortest round-trip form, with a '.' so YAML 1.1 readers (PyYAML) also see a float.
std::string format_real(double v) {
  if (std::isnan(v)) return ".nan";
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".e") == std::string::npos) return s + ".0";
  size_t e = s.find('e');
  if (e != std::string::npos && s.find('.') == std::string::npos) s.insert(e, ".0");
  return s;
}

std::string format_number(double v) {  // bounds in messages: "1", "0.5"
  return fmt::format("{}", v);
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string leaf(const std::string& name) {
  size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

size_t depth(const std::string& name) { return static_cast<size_t>(std::count(name.begin(), name.end(), '.')); }

}  // namespace

std::string format_config_value(const ConfigValue& value, bool quoted) {
  return std::visit(
      [&](const auto& v) -> std::string {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, int64_t>) {
          return std::to_string(v);
        } else if constexpr (std::is_same_v<T, double>) {
          return format_real(v);
        } else if constexpr (std::is_same_v<T, bool>) {
          return v ? "true" : "false";
        } else if constexpr (std::is_same_v<T, std::string>) {
          return quoted || v.empty() ? quote(v) : v;
        } else {
          std::string out = "[";
          for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + (quoted ? quote(v[i]) : v[i]);
          return out + "]";
        }
      },
      value);
}

// ---- ConfigKey ----

ConfigKey& ConfigKey::min(double lo) {
  LOOM_CHECK(type_ == KeyType::integer || type_ == KeyType::real)
      << name_ << ": min() on a " << key_type_name(type_) << " key";
  has_lo_ = true, lo_open_ = false, lo_ = lo;
  return *this;
}

ConfigKey& ConfigKey::max(double hi) {
  LOOM_CHECK(type_ == KeyType::integer || type_ == KeyType::real)
      << name_ << ": max() on a " << key_type_name(type_) << " key";
  has_hi_ = true, hi_open_ = false, hi_ = hi;
  return *this;
}

ConfigKey& ConfigKey::above(double lo) {
  min(lo);
  lo_open_ = true;
  return *this;
}

ConfigKey& ConfigKey::below(double hi) {
  max(hi);
  hi_open_ = true;
  return *this;
}

ConfigKey& ConfigKey::one_of(std::vector<std::string> allowed) {
  LOOM_CHECK(type_ == KeyType::string || type_ == KeyType::choice)
      << name_ << ": one_of() on a " << key_type_name(type_) << " key";
  LOOM_CHECK(!allowed.empty()) << name_ << ": one_of() needs at least one value";
  type_ = KeyType::choice;
  allowed_ = std::move(allowed);
  LOOM_CHECK(violation(default_).empty())
      << name_ << ": default " << format_config_value(default_, true) << " is not among the allowed values";
  return *this;
}

ConfigKey& ConfigKey::allow(const std::string& value) {
  LOOM_CHECK(type_ == KeyType::choice) << name_ << ": allow() on a key that is not an enum";
  if (std::find(allowed_.begin(), allowed_.end(), value) == allowed_.end()) allowed_.push_back(value);
  return *this;
}

ConfigKey& ConfigKey::letters(const std::string& letters) {
  LOOM_CHECK(type_ == KeyType::string) << name_ << ": letters() on a " << key_type_name(type_) << " key";
  for (char ch : letters) {
    if (letters_.find(ch) == std::string::npos) letters_ += ch;
  }
  non_empty_ = true;
  return *this;
}

ConfigKey& ConfigKey::non_empty() {
  LOOM_CHECK(type_ == KeyType::string || type_ == KeyType::string_list)
      << name_ << ": non_empty() on a " << key_type_name(type_) << " key";
  non_empty_ = true;
  return *this;
}

ConfigKey& ConfigKey::satisfies(std::function<bool(const ConfigValue&)> ok, std::string allowed) {
  rules_.emplace_back(std::move(ok), std::move(allowed));
  return *this;
}

void ConfigKey::set(RunConfig& config, const ConfigValue& value) const {
  LOOM_CHECK(value.index() == default_.index())
      << name_ << ": setting a " << key_type_name(type_) << " key from a value of another type";
  set_(config, value);
}

std::string ConfigKey::violation(const ConfigValue& value) const {
  if (value.index() != default_.index()) return std::string("not a ") + key_type_name(type_);
  if (has_lo_ || has_hi_) {
    double v = std::holds_alternative<int64_t>(value) ? static_cast<double>(std::get<int64_t>(value))
                                                      : std::get<double>(value);
    bool low = has_lo_ && (lo_open_ ? !(v > lo_) : !(v >= lo_));
    bool high = has_hi_ && (hi_open_ ? !(v < hi_) : !(v <= hi_));
    if (low || high || std::isnan(v)) return "out of range (allowed: " + allowed_text() + ")";
  }
  if (type_ == KeyType::choice) {
    const auto& s = std::get<std::string>(value);
    if (std::find(allowed_.begin(), allowed_.end(), s) == allowed_.end()) {
      std::string allowed;
      for (size_t i = 0; i < allowed_.size(); ++i) allowed += (i ? ", " : "") + allowed_[i];
      return "not one of the allowed values (allowed: " + allowed + ")";
    }
  }
  if (non_empty_) {
    bool empty = std::holds_alternative<std::string>(value) ? std::get<std::string>(value).empty()
                                                            : std::get<std::vector<std::string>>(value).empty();
    if (empty) return "must not be empty (allowed: " + allowed_text() + ")";
  }
  if (!letters_.empty()) {
    for (char ch : std::get<std::string>(value)) {
      if (letters_.find(ch) == std::string::npos) {
        return fmt::format("letter '{}' is not allowed (allowed: {})", ch, allowed_text());
      }
    }
  }
  for (const auto& [ok, allowed] : rules_) {
    if (!ok(value)) return "not allowed (allowed: " + allowed + ")";
  }
  return "";
}

std::string ConfigKey::allowed_text() const {
  std::string text = key_type_name(type_);
  if (type_ == KeyType::choice) {
    text += ":";
    for (size_t i = 0; i < allowed_.size(); ++i) text += (i ? " | " : " ") + allowed_[i];
    return text;
  }
  if (has_lo_ && has_hi_) {
    text += fmt::format(" in {}{}, {}{}", lo_open_ ? "(" : "[", format_number(lo_), format_number(hi_),
                        hi_open_ ? ")" : "]");
  } else if (has_lo_) {
    text += fmt::format(" {} {}", lo_open_ ? ">" : ">=", format_number(lo_));
  } else if (has_hi_) {
    text += fmt::format(" {} {}", hi_open_ ? "<" : "<=", format_number(hi_));
  }
  if (!letters_.empty()) {
    text += " of letters";
    for (char ch : letters_) text += fmt::format(" {}", ch);
  } else if (non_empty_) {
    text = "non-empty " + text;
  }
  for (const auto& rule : rules_) text += ": " + rule.second;
  return text;
}

// ---- ConfigSchema ----

ConfigKey& ConfigSchema::add_key(std::string name, KeyType type, ConfigValue default_value,
                                 std::function<ConfigValue(const RunConfig&)> get,
                                 std::function<void(RunConfig&, const ConfigValue&)> set, std::string doc) {
  LOOM_CHECK(!name.empty() && name.front() != '.' && name.back() != '.' && name.find("..") == std::string::npos &&
             name.find('.') != std::string::npos)
      << "config key \"" << name << "\" must be a dotted name: section.key";
  LOOM_CHECK(!index_.count(name)) << "config key " << name << " registered twice";
  LOOM_CHECK(!sections_.count(name)) << "config key " << name << " is already a section of other keys";
  LOOM_CHECK(!doc.empty() && doc.find('\n') == std::string::npos) << "config key " << name << " needs a one-line doc";
  for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1)) {
    std::string prefix = name.substr(0, dot);
    LOOM_CHECK(!index_.count(prefix)) << "config key " << name << " would nest under the key " << prefix;
    sections_.insert(prefix);
  }
  ConfigKey& key = keys_.emplace_back();
  key.name_ = name;
  key.type_ = type;
  key.doc_ = std::move(doc);
  key.default_ = std::move(default_value);
  key.get_ = std::move(get);
  key.set_ = std::move(set);
  index_[std::move(name)] = keys_.size() - 1;
  return key;
}

const ConfigKey* ConfigSchema::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &keys_[it->second];
}

const ConfigKey& ConfigSchema::key(const std::string& name) const {
  const ConfigKey* key = find(name);
  LOOM_CHECK(key != nullptr) << "unknown config key " << name;
  return *key;
}

ConfigKey& ConfigSchema::key(const std::string& name) {
  return const_cast<ConfigKey&>(static_cast<const ConfigSchema&>(*this).key(name));
}

std::vector<std::string> ConfigSchema::top_sections() const {
  std::vector<std::string> out;
  for (const auto& key : keys_) {
    std::string top = key.name().substr(0, key.name().find('.'));
    if (std::find(out.begin(), out.end(), top) == out.end()) out.push_back(top);
  }
  return out;
}

std::string ConfigSchema::suggest(const std::string& unknown) const {
  // Candidates: keys and sections at the same depth. The same last name in
  // another section ("train.lr" -> "optim.lr") counts as one edit.
  std::string best;
  size_t best_distance = std::max<size_t>(2, leaf(unknown).size() / 3) + 1;
  auto consider = [&](const std::string& candidate) {
    if (depth(candidate) != depth(unknown)) return;
    size_t d = edit_distance(unknown, candidate);
    if (depth(unknown) > 0 && leaf(unknown) == leaf(candidate)) d = std::min<size_t>(d, 1);
    if (d < best_distance) best_distance = d, best = candidate;
  };
  for (const auto& key : keys_) consider(key.name());
  for (const auto& section : sections_) consider(section);
  return best;
}

std::vector<std::string> ConfigSchema::problems(const RunConfig& config) const {
  std::vector<std::string> out;
  for (const auto& key : keys_) {
    ConfigValue value = key.get(config);
    std::string problem = key.violation(value);
    if (!problem.empty()) out.push_back(key.name() + " = " + format_config_value(value, true) + ": " + problem);
  }
  for (const auto& check : checks_) {
    std::string problem = check(config);
    if (!problem.empty()) out.push_back(std::move(problem));
  }
  return out;
}

}  // namespace loom
