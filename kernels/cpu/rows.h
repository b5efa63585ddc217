// Row gather and scatter-add shared by the embedding and MoE dispatch kernels.
// The scatter-add gives each thread whole column blocks and visits the indices
// in order, so repeated indices add up in the same order on every run.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace loom::cpu {

// out[i, :] = table[index[i], :]
template <typename T>
void gather_rows(T* out, const T* table, const std::vector<int64_t>& index, int64_t width) {
  int64_t n = static_cast<int64_t>(index.size());
#pragma omp parallel for schedule(static) if (n * width > (int64_t{1} << 16))
  for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * width, table + index[i] * width, width * sizeof(T));
}

// table[index[i], :] += rows[i, :], deterministic.
template <typename T>
void scatter_add_rows(T* table, const T* rows, const std::vector<int64_t>& index, int64_t width) {
  constexpr int64_t block = 64;  // columns per work item
  int64_t n = static_cast<int64_t>(index.size()), blocks = (width + block - 1) / block;
#pragma omp parallel for schedule(static) if (blocks > 1 && n * width > (int64_t{1} << 16))
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t c0 = b * block, c1 = std::min(width, c0 + block);
    for (int64_t i = 0; i < n; ++i) {
      T* dst = table + index[i] * width;
      const T* src = rows + i * width;
      for (int64_t j = c0; j < c1; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace loom::cpu
