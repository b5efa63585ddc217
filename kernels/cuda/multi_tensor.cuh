// Multi-tensor launches (AdamW, grad-norm): many flat spans of different
// sizes handled by one kernel launch. The spans' pointers and sizes travel in
// the kernel's parameters (a __grid_constant__ table, up to kMaxSpans spans,
// ~6 KB: needs the large kernel-parameter support of CUDA >= 12.1), so there
// is no host-to-device copy and no synchronization per step. Each span is cut
// into chunks of kChunk elements; block b finds its span by binary search
// over the chunk offsets. Chunk boundaries depend only on the span sizes, so
// per-chunk partial results are reproducible.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/cuda/kernel_utils.cuh"

namespace loom::cuda::multi {

constexpr int kMaxSpans = 96;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block

template <int kPtrs>
struct SpanTable {
  int count = 0;
  int64_t first_chunk[kMaxSpans + 1];  // chunk offsets; first_chunk[count] = total chunks
  int64_t numel[kMaxSpans];
  double scalar[kMaxSpans];            // a per-span value (AdamW: the decay factor)
  int64_t index[kMaxSpans];            // the span's position in the caller's list
  bool aligned[kMaxSpans];             // every pointer of the span fits its packed access
  void* ptr[kMaxSpans][kPtrs];
};

// The span holding global chunk `chunk`.
template <int kPtrs>
__device__ __forceinline__ int find_span(const SpanTable<kPtrs>& table, int64_t chunk) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_chunk[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Fills tables of at most kMaxSpans spans and calls launch(table, total_chunks)
// for each full table and the last one. add() takes the span's pointers.
template <int kPtrs>
class TableBuilder {
 public:
  explicit TableBuilder(std::function<void(const SpanTable<kPtrs>&, int64_t)> launch) : launch_(std::move(launch)) {}
  void add(const std::array<void*, kPtrs>& pointers, int64_t numel, double scalar, int64_t index, bool aligned) {
    if (numel == 0) return;
    if (table_.count == kMaxSpans) flush();
    const int i = table_.count++;
    table_.first_chunk[i] = chunks_;
    table_.numel[i] = numel;
    table_.scalar[i] = scalar;
    table_.index[i] = index;
    table_.aligned[i] = aligned;
    for (int k = 0; k < kPtrs; ++k) table_.ptr[i][k] = pointers[k];
    chunks_ += (numel + kChunk - 1) / kChunk;
    table_.first_chunk[i + 1] = chunks_;
  }
  void flush() {
    if (table_.count > 0) launch_(table_, chunks_);
    table_.count = 0;
    chunks_ = 0;
  }

 private:
  std::function<void(const SpanTable<kPtrs>&, int64_t)> launch_;
  SpanTable<kPtrs> table_;
  int64_t chunks_ = 0;
};

}  // namespace loom::cuda::multi
