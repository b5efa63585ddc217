// Query and key positions for the CUDA attention tests (interim and flash
// kernels): the layouts the model and sequence parallelism produce, plus the
// awkward ones (shuffled, rows that see nothing).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "framework/tensor.h"

namespace loom::cuda_testing {

enum class Positions { arange, query_suffix, shuffled, zigzag, late_keys };

// q (T) and k (S) positions: arange (T == S); queries at the end of the keys
// (S - T + i, a ring step's diagonal block); a shared random permutation
// (T == S); zigzag (T == S: the sequence cut into 4 chunks, rank 0's pair
// c0 c3 then rank 1's c1 c2, uneven when T % 4 != 0); keys shifted by 5, so
// the first causal rows see nothing.
inline void make_positions(Positions kind, int64_t T, int64_t S, uint64_t seed, Tensor& qp, Tensor& kp) {
  std::vector<int64_t> q(static_cast<size_t>(T)), k(static_cast<size_t>(S));
  std::iota(k.begin(), k.end(), int64_t{0});
  std::iota(q.begin(), q.end(), int64_t{0});
  if (kind == Positions::query_suffix) {
    for (int64_t i = 0; i < T; ++i) q[static_cast<size_t>(i)] = S - T + i;
  } else if (kind == Positions::shuffled) {
    std::mt19937_64 rng(seed);
    std::shuffle(k.begin(), k.end(), rng);
    q = k;
  } else if (kind == Positions::zigzag) {
    const int64_t c = T / 4;
    std::vector<int64_t> order;
    for (int64_t chunk : {0, 3, 1, 2}) {
      const int64_t lo = chunk * c, hi = chunk == 3 ? T : (chunk + 1) * c;
      for (int64_t p = lo; p < hi; ++p) order.push_back(p);
    }
    q = order;
    k = order;
  } else if (kind == Positions::late_keys) {
    for (int64_t j = 0; j < S; ++j) k[static_cast<size_t>(j)] = j + 5;
  }
  qp = Tensor::from_vector<int64_t>(q, {T});
  kp = Tensor::from_vector<int64_t>(k, {S});
}

}  // namespace loom::cuda_testing
