// Datasets: token files on disk, one token stream over many files, and the
// data loader that cuts that stream into (B, T) training batches.
//
//   token files   llm.c shards (256 x int32 header, uint16 tokens) — written and read;
//                 Megatron indexed datasets (<prefix>.idx + <prefix>.bin) — read (writer for tests/tools).
//                 Both are memory-mapped; structure is validated at open (O(1) or O(sequences)),
//                 token ids against the vocabulary on every read (so a 10B-token dataset is never
//                 scanned at start-up; check_all_tokens() does the full scan on demand).
//   TokenSource   the concatenation of its files as one stream; documents are already separated
//                 by the end-of-document token inside the data.
//   DataLoader    windows of T+1 tokens with stride T, shuffled per epoch by a Philox permutation
//                 keyed by (seed, epoch); a global batch of B_global windows is split rank-major over
//                 the dp group, so the union over ranks is the 1-rank batch. State (epoch, step)
//                 round-trips through JSON for exact resume.
//   text corpora  prepare_text_corpus (byte tokenizer → llm.c shards) and find_demo_corpus.
//
// The tokenizer lives in framework/tokenizer.h. Multi-byte values on disk are little-endian;
// the host is required to be little-endian too (checked at compile time).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <string>
#include <vector>

#include "framework/file_io.h"
#include "framework/tensor.h"

namespace loom {

// ---------------------------------------------------------------- files

// A read-only memory mapping of a whole file (empty files map to size 0).
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);  // throws naming the path and errno text
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A flat stream of token ids stored in one file (or one file pair).
class TokenFile {
 public:
  virtual ~TokenFile() = default;
  virtual int64_t num_tokens() const = 0;
  // out[0 .. end - begin) = tokens [begin, end). Throws (naming the file, the position, the
  // value and the vocabulary size) on a token outside [0, vocab_size) when vocab_size > 0.
  virtual void read(int64_t* out, int64_t begin, int64_t end) const = 0;
  virtual void read(int32_t* out, int64_t begin, int64_t end) const = 0;
  virtual const std::string& path() const = 0;  // what errors name (the .bin for Megatron)
  virtual int64_t vocab_size() const = 0;       // 0: unchecked
  // Reads every token once, checking it against the vocabulary.
  void check_all_tokens() const;
};

// ---- llm.c token shards: int32 header[256] = {magic, version, num_tokens, 0...}, uint16 tokens

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr int32_t kShardVersion = 1;
inline constexpr int64_t kShardHeaderInts = 256;
inline constexpr int64_t kShardHeaderBytes = kShardHeaderInts * 4;

// Writes an llm.c shard atomically. Every token must be in [0, 65535].
void write_token_shard(const std::string& path, std::span<const int32_t> tokens);

class TokenShard final : public TokenFile {
 public:
  // Validates size >= header, magic, version and that the file holds exactly num_tokens tokens.
  explicit TokenShard(const std::string& path, int64_t vocab_size = 0);
  int64_t num_tokens() const override { return num_tokens_; }
  void read(int64_t* out, int64_t begin, int64_t end) const override;
  void read(int32_t* out, int64_t begin, int64_t end) const override;
  const std::string& path() const override { return file_.path(); }
  int64_t vocab_size() const override { return vocab_size_; }

 private:
  template <typename Out>
  void read_impl(Out* out, int64_t begin, int64_t end) const;
  MappedFile file_;
  int64_t num_tokens_ = 0;
  int64_t vocab_size_ = 0;
};

// ---- Megatron indexed datasets (MMapIndexedDataset, index version 1)
// .idx: "MMIDIDX\0\0", u64 version = 1, u8 dtype code, u64 sequence count S, u64 document
// count D (length of document_indices = documents + 1), i32 sizes[S], i64 pointers[S] (byte
// offsets into .bin), i64 document_indices[D] (sequence index where each document starts, last
// = S), then optionally i8 modes[S] (multimodal datasets; ignored).

enum class IndexedDType : uint8_t { u8 = 1, i8 = 2, i16 = 3, i32 = 4, i64 = 5, f64 = 6, f32 = 7, u16 = 8 };
const char* indexed_dtype_name(IndexedDType dtype);
size_t indexed_dtype_size(IndexedDType dtype);  // throws on an unknown code

// Writes <prefix>.idx and <prefix>.bin (atomically). `document_indices` empty means one
// document per sequence (0, 1, ..., S). Token values must fit `dtype` (an integer type).
void write_indexed_dataset(const std::string& prefix, const std::vector<std::vector<int64_t>>& sequences,
                           IndexedDType dtype = IndexedDType::u16, std::vector<int64_t> document_indices = {});

class IndexedDataset final : public TokenFile {
 public:
  // `prefix` without extension. Validates the index header, dtype (integers only), that
  // sizes are >= 0, pointers contiguous and aligned, document indices monotone from 0 to S,
  // the .idx length, and that the .bin holds exactly the indexed tokens.
  explicit IndexedDataset(const std::string& prefix, int64_t vocab_size = 0);
  int64_t num_tokens() const override { return num_tokens_; }
  void read(int64_t* out, int64_t begin, int64_t end) const override;
  void read(int32_t* out, int64_t begin, int64_t end) const override;
  const std::string& path() const override { return bin_.path(); }
  int64_t vocab_size() const override { return vocab_size_; }

  const std::string& prefix() const { return prefix_; }
  IndexedDType dtype() const { return dtype_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return static_cast<int64_t>(document_indices_.size()) - 1; }
  int64_t sequence_length(int64_t i) const;  // tokens
  int64_t sequence_start(int64_t i) const;   // token offset of sequence i in the stream
  const std::vector<int64_t>& document_indices() const { return document_indices_; }

 private:
  template <typename Out>
  void read_impl(Out* out, int64_t begin, int64_t end) const;
  std::string prefix_;
  MappedFile idx_, bin_;
  IndexedDType dtype_ = IndexedDType::u16;
  int64_t num_sequences_ = 0;
  int64_t num_tokens_ = 0;
  int64_t vocab_size_ = 0;
  size_t sizes_offset_ = 0, pointers_offset_ = 0;  // byte offsets of the arrays in .idx
  std::vector<int64_t> document_indices_;
};

// Opens one entry: a Megatron dataset when `entry` ends in .idx, or `entry`.idx exists, or
// `entry` ends in .bin with a sibling .idx; otherwise an llm.c shard.
std::unique_ptr<TokenFile> open_token_file(const std::string& entry, int64_t vocab_size = 0);

// ---------------------------------------------------------------- token stream

// The concatenation of token files as one stream of num_tokens() tokens.
class TokenSource {
 public:
  // `spec`: comma-separated entries; each is a path, a glob (matches sorted; no match is an
  // error) or a Megatron prefix (see open_token_file). A Megatron dataset matched twice by a
  // glob (its .idx and its .bin) is opened once.
  explicit TokenSource(const std::string& spec, int64_t vocab_size = 0);
  explicit TokenSource(const std::vector<std::string>& entries, int64_t vocab_size = 0);

  int64_t num_tokens() const { return starts_.back(); }
  int64_t vocab_size() const { return vocab_size_; }
  size_t num_files() const { return files_.size(); }
  const TokenFile& file(size_t i) const { return *files_.at(i); }
  const std::string& spec() const { return spec_; }
  // "<spec> (N files, M tokens)" for messages.
  std::string describe() const;

  // out[0 .. end - begin) = stream tokens [begin, end), across file boundaries.
  void read(int64_t* out, int64_t begin, int64_t end) const;
  void read(int32_t* out, int64_t begin, int64_t end) const;
  Tensor read(int64_t begin, int64_t end) const;  // (end - begin) i64, CPU
  void check_all_tokens() const;

 private:
  template <typename Out>
  void read_impl(Out* out, int64_t begin, int64_t end) const;
  void open_entries(const std::vector<std::string>& entries);
  std::string spec_;
  int64_t vocab_size_ = 0;
  std::vector<std::unique_ptr<TokenFile>> files_;
  std::vector<int64_t> starts_{0};  // starts_[i] = first stream token of file i; back() = total
};

// ---------------------------------------------------------------- loader

struct DataLoaderOptions {
  int64_t seq_len = 0;       // T: tokens per row (a window holds T + 1)
  int64_t global_batch = 0;  // B_global: rows per step over the whole dp group
  int64_t dp_rank = 0;       // r in [0, P)
  int64_t dp_size = 1;       // P; must divide global_batch
  uint64_t seed = 0;
  bool shuffle = true;       // false = eval mode: windows in stream order, same every pass
};

// Where a loader is: the next batch to produce is (epoch, step). The other fields describe the
// data it was saved for; set_state refuses a state saved for different data or shapes.
struct DataLoaderState {
  int64_t epoch = 0;
  int64_t step = 0;  // within the epoch, in [0, steps_per_epoch)
  uint64_t seed = 0;
  int64_t seq_len = 0;
  int64_t global_batch = 0;
  int64_t num_tokens = 0;

  nlohmann::json to_json() const;
  static DataLoaderState from_json(const nlohmann::json& j);  // throws naming a missing key
  bool operator==(const DataLoaderState&) const = default;
};

struct Batch {
  Tensor inputs;   // (B, T) i64: window tokens [0, T)
  Tensor targets;  // (B, T) i64: window tokens [1, T + 1)
  int64_t epoch = 0;
  int64_t step = 0;
};

// Window w covers stream tokens [w*T, w*T + T + 1); there are (N - 1) / T of them. Epoch e
// visits them in the order window_permutation(W, seed, e) (identity in eval mode); step g of
// the epoch takes permuted positions [g*B_global, (g+1)*B_global), of which dp rank r keeps
// rows [r*B, (r+1)*B) with B = B_global / P. The tail of W / B_global is dropped each epoch.
// Not thread-safe (caches the current epoch's permutation).
class DataLoader {
 public:
  // Throws when the source holds fewer than one global batch of windows (naming the files,
  // the tokens they hold and the tokens needed).
  DataLoader(std::shared_ptr<const TokenSource> source, const DataLoaderOptions& options);

  Batch next();                              // the batch at state(), then advances (wrapping epochs)
  Batch batch_at(int64_t epoch, int64_t step);  // random access; does not move the state
  void reset() { epoch_ = 0; step_ = 0; }    // back to the first batch (eval: call before each pass)

  DataLoaderState state() const;
  void set_state(const DataLoaderState& state);  // throws on mismatched data/shapes or step range

  int64_t num_windows() const { return num_windows_; }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  int64_t local_batch() const { return options_.global_batch / options_.dp_size; }  // B
  const DataLoaderOptions& options() const { return options_; }
  const TokenSource& source() const { return *source_; }
  // Stream window index of global row `row` (in [0, B_global)) of (epoch, step).
  int64_t window_at(int64_t epoch, int64_t step, int64_t row);

 private:
  std::shared_ptr<const TokenSource> source_;
  DataLoaderOptions options_;
  int64_t num_windows_ = 0;
  int64_t steps_per_epoch_ = 0;
  int64_t epoch_ = 0, step_ = 0;
  int64_t cached_epoch_ = -1;
  std::vector<uint32_t> permutation_;  // of the cached epoch (shuffle mode)
};

// A uniformly random permutation of [0, n) (Fisher-Yates), a function of (seed, epoch) only:
// draw i uses Philox counter (i, epoch) under key seed, in a stream reserved for data shuffling.
std::vector<uint32_t> window_permutation(int64_t n, uint64_t seed, int64_t epoch);

// ---------------------------------------------------------------- text corpora

// Reads a whole file; gzip data (by its magic bytes) goes through `gzip -dc`. Throws naming the
// file when it is missing, unreadable, or gzip fails.
std::string read_text_file(const std::string& path);

// Cuts text into documents at paragraph boundaries (a blank line), each at least
// `target_bytes` long except the last; a paragraph longer than 4 x target is cut at a line
// end, and text without line ends every 16 x target bytes. The documents concatenate back
// to `text` exactly. Empty text gives no documents.
std::vector<std::string> split_documents(const std::string& text, int64_t target_bytes);

struct PreparedCorpus {
  std::vector<std::string> train_shards;  // DIR/<name>_train_000000.bin, ...
  std::vector<std::string> val_shards;    // DIR/<name>_val_000000.bin, ... (empty when val_fraction = 0)
  int64_t train_tokens = 0, val_tokens = 0;
  int64_t train_documents = 0, val_documents = 0;
  int64_t input_bytes = 0;
  std::vector<std::string> removed_stale;  // older <name>_{train,val}_NNNNNN.bin not rewritten now
};

// Byte-tokenizes text files into llm.c shards: each file is split into documents
// (split_documents), each document is followed by the end-of-document id 256, the last
// round(val_fraction x documents) documents (at least 1 when val_fraction > 0) become the
// validation split, and each split is cut into shards of at most `shard_tokens` tokens
// (documents may straddle shards: the loader reads one stream). Shards are written
// atomically; stale shards of the same name from an earlier run are removed so that a glob
// sees only this run. Under MPI call it on one rank and barrier: ranks would race on the
// stale-shard clean-up. Meant for small corpora (everything is held in memory).
PreparedCorpus prepare_text_corpus(const std::vector<std::string>& files, const std::string& out_dir,
                                   const std::string& name = "demo", double val_fraction = 0.05,
                                   int64_t shard_tokens = 100'000'000, int64_t document_bytes = 8192);

// The Jargon File from Debian's jargon-text package (gzip text under /usr/share/doc/jargon-text/).
// Throws saying to install jargon-text or to point data.text at any text file.
std::string find_demo_corpus();

}  // namespace loom
