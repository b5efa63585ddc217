// TokenSource: many token files read as one stream. Entries come from a comma list whose
// items may be globs (expanded with POSIX glob, sorted) or Megatron prefixes.
#include <glob.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "framework/data.h"
#include "framework/error.h"

namespace loom {
namespace {

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\n");
  return s.substr(b, e - b + 1);
}

std::vector<std::string> split_spec(const std::string& spec) {
  std::vector<std::string> entries;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    if (comma == std::string::npos) comma = spec.size();
    std::string entry = trim(spec.substr(start, comma - start));
    if (!entry.empty()) entries.push_back(entry);
    start = comma + 1;
  }
  return entries;
}

std::vector<std::string> expand_glob(const std::string& pattern) {
  glob_t g{};
  int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> paths;
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
  }
  ::globfree(&g);
  LOOM_CHECK(rc == 0 || rc == GLOB_NOMATCH) << "glob '" << pattern << "' failed (glob error " << rc << ")";
  LOOM_CHECK(!paths.empty()) << "no token files match '" << pattern << "'";
  std::sort(paths.begin(), paths.end());
  return paths;
}

// The Megatron prefix a path belongs to ("" for an llm.c shard), as open_token_file decides.
std::string megatron_prefix(const std::string& path) {
  std::error_code ec;
  auto stem_of = [&](const char* ext) -> std::string {
    if (path.size() > 4 && path.compare(path.size() - 4, 4, ext) == 0) return path.substr(0, path.size() - 4);
    return "";
  };
  if (std::string stem = stem_of(".idx"); !stem.empty()) return stem;
  if (std::filesystem::exists(path + ".idx", ec)) return path;
  if (std::string stem = stem_of(".bin"); !stem.empty() && std::filesystem::exists(stem + ".idx", ec)) return stem;
  return "";
}

}  // namespace

TokenSource::TokenSource(const std::string& spec, int64_t vocab_size) : spec_(spec), vocab_size_(vocab_size) {
  std::vector<std::string> entries = split_spec(spec);
  LOOM_CHECK(!entries.empty()) << "empty token source spec '" << spec << "' (expected files, globs or Megatron prefixes)";
  open_entries(entries);
}

TokenSource::TokenSource(const std::vector<std::string>& entries, int64_t vocab_size) : vocab_size_(vocab_size) {
  LOOM_CHECK(!entries.empty()) << "token source with no files";
  for (size_t i = 0; i < entries.size(); ++i) spec_ += (i ? "," : "") + entries[i];
  open_entries(entries);
}

void TokenSource::open_entries(const std::vector<std::string>& entries) {
  std::set<std::string> megatron_seen;  // a glob may match both <prefix>.idx and <prefix>.bin
  for (const std::string& entry : entries) {
    const bool is_glob = entry.find_first_of("*?[") != std::string::npos;
    std::vector<std::string> paths = is_glob ? expand_glob(entry) : std::vector<std::string>{entry};
    for (const std::string& path : paths) {
      std::string prefix = megatron_prefix(path);
      if (!prefix.empty() && !megatron_seen.insert(prefix).second) continue;
      files_.push_back(open_token_file(path, vocab_size_));
      starts_.push_back(starts_.back() + files_.back()->num_tokens());
    }
  }
}

std::string TokenSource::describe() const {
  std::string s = "'" + spec_ + "' (" + std::to_string(files_.size()) + (files_.size() == 1 ? " file, " : " files, ") +
                  std::to_string(num_tokens()) + " tokens)";
  return s;
}

template <typename Out>
void TokenSource::read_impl(Out* out, int64_t begin, int64_t end) const {
  LOOM_CHECK(0 <= begin && begin <= end && end <= num_tokens())
      << describe() << ": read of tokens [" << begin << ", " << end << ") outside [0, " << num_tokens() << ")";
  // First file whose range contains `begin` (skipping empty files).
  size_t f = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin()) - 1;
  while (begin < end) {
    const int64_t file_end = starts_[f + 1];
    const int64_t stop = std::min(end, file_end);
    if (stop > begin) {
      files_[f]->read(out, begin - starts_[f], stop - starts_[f]);
      out += stop - begin;
      begin = stop;
    }
    ++f;
  }
}

void TokenSource::read(int64_t* out, int64_t begin, int64_t end) const { read_impl(out, begin, end); }
void TokenSource::read(int32_t* out, int64_t begin, int64_t end) const { read_impl(out, begin, end); }

Tensor TokenSource::read(int64_t begin, int64_t end) const {
  LOOM_CHECK(begin <= end) << describe() << ": read of tokens [" << begin << ", " << end << ")";
  Tensor t = Tensor::empty({end - begin}, DType::i64);  // (end - begin)
  read(t.data<int64_t>(), begin, end);
  return t;
}

void TokenSource::check_all_tokens() const {
  for (const auto& file : files_) file->check_all_tokens();
}

}  // namespace loom
