// Text corpora → llm.c shards with the byte tokenizer (what loom-prepare and the trainer's
// on-the-fly demo preparation run), and where the demo corpus (the Jargon File) lives.
//
// Documents: a file is cut at paragraph boundaries (blank lines) into documents of about
// `document_bytes`, so that a single book-sized file (the Jargon File is one ~1.7 MB file)
// still gives a few hundred documents to split into train and validation. The cut keeps
// every byte: decoding the shards and dropping the end-of-document ids gives the inputs back.
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "framework/data.h"
#include "framework/error.h"
#include "framework/tokenizer.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') q += "'\\''";
    else q += c;
  }
  return q + "'";
}

std::string gunzip(const std::string& path) {
  const std::string command = "gzip -dc -- " + shell_quote(path);
  FILE* pipe = ::popen(command.c_str(), "r");
  LOOM_CHECK(pipe != nullptr) << "cannot run '" << command << "' to read " << path << ": " << std::strerror(errno);
  std::string text;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) text.append(buffer, n);
  const int status = ::pclose(pipe);
  LOOM_CHECK(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "reading gzip file " << path << " through '" << command << "' failed (status " << status
      << (WIFEXITED(status) ? ", exit code " + std::to_string(WEXITSTATUS(status)) : std::string()) << "); "
      << "exit code 127 means gzip is not installed, 1 a corrupt or truncated file";
  return text;
}

// Position just past a blank-line run that starts with the newline at `j`, or npos when the
// line after `j` is not blank.
size_t blank_run_end(const std::string& text, size_t j) {
  const size_t n = text.size();
  size_t end = std::string::npos;
  size_t line = j + 1;  // start of the line after the newline at j
  while (true) {
    size_t q = line;
    while (q < n && (text[q] == ' ' || text[q] == '\t' || text[q] == '\r')) ++q;
    if (q < n && text[q] == '\n') {
      end = q + 1;
      line = q + 1;
    } else {
      return end;
    }
  }
}

// Where the document starting at `start` ends (see split_documents in data.h).
size_t document_end(const std::string& text, size_t start, size_t target) {
  const size_t n = text.size();
  if (n - start <= target) return n;
  const size_t paragraph_limit = std::min(n, start + 4 * target);
  for (size_t j = start + target; j < paragraph_limit; ++j) {
    if (text[j] != '\n') continue;
    size_t end = blank_run_end(text, j);
    if (end != std::string::npos) return end;
  }
  if (paragraph_limit == n) return n;
  const size_t line_limit = std::min(n, start + 16 * target);
  for (size_t j = paragraph_limit; j < line_limit; ++j) {
    if (text[j] == '\n') return j + 1;
  }
  return line_limit;
}

bool is_shard_of(const std::string& filename, const std::string& name) {
  for (const char* split : {"_train_", "_val_"}) {
    const std::string head = name + split;
    if (filename.size() != head.size() + 10 || filename.compare(0, head.size(), head) != 0) continue;
    const std::string rest = filename.substr(head.size());
    if (rest.compare(6, 4, ".bin") == 0 &&
        std::all_of(rest.begin(), rest.begin() + 6, [](char c) { return c >= '0' && c <= '9'; }))
      return true;
  }
  return false;
}

// Writes `tokens` as <out_dir>/<name>_<split>_NNNNNN.bin shards of at most shard_tokens.
std::vector<std::string> write_split(const std::vector<int32_t>& tokens, const std::string& out_dir,
                                     const std::string& name, const std::string& split, int64_t shard_tokens) {
  std::vector<std::string> paths;
  const int64_t total = static_cast<int64_t>(tokens.size());
  for (int64_t begin = 0, index = 0; begin < total; begin += shard_tokens, ++index) {
    char file[64];
    std::snprintf(file, sizeof(file), "_%s_%06lld.bin", split.c_str(), static_cast<long long>(index));
    LOOM_CHECK(index < 1000000) << "too many shards for " << name << "_" << split << " (max 1000000); raise shard_tokens";
    std::string path = (fs::path(out_dir) / (name + file)).string();
    const int64_t end = std::min(total, begin + shard_tokens);
    write_token_shard(path, std::span<const int32_t>(tokens.data() + begin, static_cast<size_t>(end - begin)));
    paths.push_back(path);
  }
  return paths;
}

}  // namespace

std::string read_text_file(const std::string& path) {
  std::error_code ec;
  LOOM_CHECK(fs::exists(path, ec)) << "input file not found: " << path;
  LOOM_CHECK(fs::is_regular_file(path, ec)) << "input is not a regular file: " << path;
  std::ifstream in(path, std::ios::binary);
  LOOM_CHECK(in.good()) << "cannot open " << path << ": " << std::strerror(errno);
  unsigned char magic[2] = {0, 0};
  in.read(reinterpret_cast<char*>(magic), 2);
  if (in.gcount() == 2 && magic[0] == 0x1f && magic[1] == 0x8b) return gunzip(path);
  in.clear();
  in.seekg(0);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LOOM_CHECK(!in.bad()) << "error reading " << path << ": " << std::strerror(errno);
  return text;
}

std::vector<std::string> split_documents(const std::string& text, int64_t target_bytes) {
  LOOM_CHECK(target_bytes >= 1) << "split_documents: target_bytes must be >= 1, got " << target_bytes;
  std::vector<std::string> docs;
  for (size_t start = 0; start < text.size();) {
    const size_t end = document_end(text, start, static_cast<size_t>(target_bytes));
    docs.push_back(text.substr(start, end - start));
    start = end;
  }
  return docs;
}

PreparedCorpus prepare_text_corpus(const std::vector<std::string>& files, const std::string& out_dir,
                                   const std::string& name, double val_fraction, int64_t shard_tokens,
                                   int64_t document_bytes) {
  LOOM_CHECK(!files.empty()) << "prepare_text_corpus: no input files";
  LOOM_CHECK(val_fraction >= 0.0 && val_fraction < 1.0) << "prepare_text_corpus: val_fraction " << val_fraction
                                                        << " outside [0, 1)";
  LOOM_CHECK(shard_tokens >= 1) << "prepare_text_corpus: shard_tokens must be >= 1, got " << shard_tokens;
  LOOM_CHECK(!name.empty() && name.find('/') == std::string::npos)
      << "prepare_text_corpus: name '" << name << "' must be non-empty and contain no '/'";
  std::error_code ec;
  for (const std::string& f : files) LOOM_CHECK(fs::exists(f, ec)) << "input file not found: " << f;

  PreparedCorpus result;
  std::vector<std::string> docs;
  for (const std::string& f : files) {
    std::string text = read_text_file(f);
    result.input_bytes += static_cast<int64_t>(text.size());
    std::vector<std::string> file_docs = split_documents(text, document_bytes);
    for (auto& d : file_docs) docs.push_back(std::move(d));
  }
  const int64_t num_docs = static_cast<int64_t>(docs.size());
  LOOM_CHECK(num_docs >= 1) << "prepare_text_corpus: the input files hold no text (" << files.size() << " files, "
                            << result.input_bytes << " bytes)";
  int64_t num_val = 0;
  if (val_fraction > 0.0) {
    LOOM_CHECK(num_docs >= 2) << "prepare_text_corpus: " << num_docs << " document (" << result.input_bytes
                              << " bytes) cannot be split into train and validation; add text, use smaller "
                                 "documents than "
                              << document_bytes << " bytes, or set val_fraction 0";
    num_val = std::clamp<int64_t>(std::llround(val_fraction * static_cast<double>(num_docs)), 1, num_docs - 1);
  }
  const int64_t num_train = num_docs - num_val;

  ByteTokenizer tokenizer;
  std::vector<int32_t> train, val;
  for (int64_t d = 0; d < num_docs; ++d) {
    std::vector<int32_t>& out = d < num_train ? train : val;
    tokenizer.encode_append(docs[static_cast<size_t>(d)], out);
    out.push_back(tokenizer.end_of_document());
  }

  fs::create_directories(out_dir, ec);
  LOOM_CHECK(fs::is_directory(out_dir)) << "cannot create output directory " << out_dir << ": " << ec.message();
  result.train_shards = write_split(train, out_dir, name, "train", shard_tokens);
  result.val_shards = write_split(val, out_dir, name, "val", shard_tokens);
  result.train_tokens = static_cast<int64_t>(train.size());
  result.val_tokens = static_cast<int64_t>(val.size());
  result.train_documents = num_train;
  result.val_documents = num_val;

  // Shards of the same name left by an earlier run (e.g. with smaller shards) would be
  // picked up by a glob over this run's output: remove them.
  std::set<std::string> written;
  for (const auto* list : {&result.train_shards, &result.val_shards})
    for (const auto& p : *list) written.insert(fs::path(p).filename().string());
  for (const auto& entry : fs::directory_iterator(out_dir)) {
    const std::string filename = entry.path().filename().string();
    if (is_shard_of(filename, name) && !written.count(filename)) {
      fs::remove(entry.path(), ec);
      LOOM_CHECK(!ec) << "cannot remove stale shard " << entry.path().string() << ": " << ec.message();
      result.removed_stale.push_back(entry.path().string());
    }
  }
  return result;
}

std::string find_demo_corpus() {
  const char* candidates[] = {
      "/usr/share/doc/jargon-text/jargon.txt.gz",  // Debian 12 (jargon-text 4.4.7)
      "/usr/share/doc/jargon-text/jargon.txt",
      "/usr/local/share/doc/jargon-text/jargon.txt.gz",
      "/usr/local/share/doc/jargon-text/jargon.txt",
  };
  std::error_code ec;
  std::string looked;
  for (const char* c : candidates) {
    if (fs::is_regular_file(c, ec)) return c;
    looked += looked.empty() ? c : std::string(", ") + c;
  }
  LOOM_FAIL() << "demo corpus not found: the Jargon File comes from Debian's jargon-text package (looked in: " << looked
              << "). Install it with `apt-get install jargon-text` (minimal images that exclude /usr/share/doc need "
                 "that path-exclude removed from /etc/dpkg/dpkg.cfg.d), or set data.text to any text file";
}

}  // namespace loom
