// TokenLayout: which global token positions each rank of the cp (context /
// sequence parallel) group holds. This is the one place the split is decided
// (ALGORITHMS.md §3); the data loader, RoPE positions, causal masks, the loss
// and every mixer ask it instead of computing offsets themselves.
//
//   contiguous: the sequence is cut into P chunks, rank r holds chunk r.
//   zigzag:     the sequence is cut into 2P chunks, rank r holds chunks r and
//               2P-1-r (in that local order), which balances causal softmax work.
//
// Lengths that do not divide are rejected (never padded): padding would change
// the model's math (positions, loss normalization) depending on cp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "framework/tensor.h"

namespace loom {

enum class LayoutKind { contiguous, zigzag };
// "contiguous" | "zigzag"; any other value is an error naming it.
LayoutKind parse_layout_kind(const std::string& name);
const char* layout_kind_name(LayoutKind kind);

// Global positions [start, start + length).
struct TokenChunk {
  int64_t start = 0;
  int64_t length = 0;
};

class TokenLayout {
 public:
  // contiguous needs seq_len % cp == 0, zigzag seq_len % (2 * cp) == 0; otherwise an
  // error naming seq_len, cp, the layout and the multiple required.
  TokenLayout(LayoutKind kind, int64_t seq_len, int cp_size);

  LayoutKind kind() const { return kind_; }
  int64_t seq_len() const { return seq_len_; }
  int cp_size() const { return cp_size_; }
  int64_t local_len() const { return seq_len_ / cp_size_; }  // tokens per rank

  // This rank's chunks in local order: contiguous {r}, zigzag {r, 2P-1-r}.
  const std::vector<TokenChunk>& chunks(int rank) const;
  // (local_len) i64: the global position of each local token, in local order.
  Tensor positions(int rank) const;
  // This rank's tokens of `global` along `dim` (size seq_len there), as a new contiguous tensor.
  Tensor shard(const Tensor& global, int rank, int dim) const;
  // Inverse of shard: locals[r] is rank r's shard (size local_len along `dim`) -> the global tensor.
  Tensor unshard(const std::vector<Tensor>& locals, int dim) const;

 private:
  void check_rank(int rank, const char* what) const;

  LayoutKind kind_;
  int64_t seq_len_;
  int cp_size_;
  std::vector<std::vector<TokenChunk>> chunks_;  // per rank
};

}  // namespace loom
