// The S2 block pattern (ALGORITHMS.md §7): which key blocks each head's query
// blocks attend. Pure functions, shared by the attention kernels (CPU now, the
// block-sparse CUDA kernel later), the S mixer and the tests, so the rule is
// written once. Blocks are indexed by GLOBAL token position (position / block),
// so a sequence-parallel split of the tokens keeps the same pattern.
#pragma once

#include <algorithm>
#include <cstdint>

namespace loom {

struct S2Pattern {
  int64_t block = 0;         // Bs: tokens per block; 0 = dense (no block mask)
  int64_t local_blocks = 1;  // query block i always sees key blocks i - local_blocks + 1 .. i
  int64_t vert_stride = 1;   // period of each pattern's strided key blocks
  bool enabled() const { return block > 0; }
  bool operator==(const S2Pattern&) const = default;
};

// Offset between consecutive patterns' strided shards: max(1, vert_stride / num_patterns).
inline int64_t s2_stride_offset(int64_t vert_stride, int64_t num_patterns) {
  return std::max<int64_t>(1, vert_stride / std::max<int64_t>(1, num_patterns));
}

// Query block i of pattern `pattern` (of `num_patterns`) attends key block j iff
// j <= i and (i - j < local_blocks or (j + pattern * stride_offset) mod vert_stride == 0).
// The diagonal block (i - i = 0 < local_blocks) is always active, so with a
// causal mask inside blocks no query row is empty.
inline bool s2_block_active(int64_t i, int64_t j, int64_t pattern, int64_t num_patterns, const S2Pattern& p) {
  if (j > i) return false;
  if (i - j < p.local_blocks) return true;
  return (j + pattern * s2_stride_offset(p.vert_stride, num_patterns)) % p.vert_stride == 0;
}

// Whether the union of the patterns' strided shards reaches every key block
// (for any context length): the residues pattern * stride_offset mod
// vert_stride must take all vert_stride values, which holds iff there are at
// least vert_stride distinct patterns (then stride_offset = 1).
inline bool s2_covers_context(int64_t num_patterns, int64_t vert_stride) { return num_patterns >= vert_stride; }

}  // namespace loom
