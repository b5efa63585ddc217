// Helpers for the sequence-parallel softmax attention tests (ring and
// all-gather): the check that P ranks equal the 1-rank attention op over the
// whole sequence (outputs and gradients of q, k, v, from a loss that uses both
// out and lse), and the test bodies both algorithms share (groups of the first
// P ranks come from tests/sp/sp_testing.h).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "framework/ops_nn.h"
#include "parallel/allgather_attention.h"
#include "parallel/comm_stats.h"
#include "parallel/ring_attention.h"
#include "parallel/mpi_communicator.h"
#include "parallel/sp_attention.h"
#include "parallel/token_layout.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/sp/sp_testing.h"
#include "tests/testing.h"

namespace loom::testing {

using SpAttentionFn = std::function<AttentionResult(const Variable&, const Variable&, const Variable&,
                                                    const AttentionOptions&, const TokenLayout&, Communicator&,
                                                    SpAttentionStats*)>;

// The two algorithms as SpAttentionFn (shared by the CPU and the GPU tests).
inline const SpAttentionFn kRing = [](const Variable& q, const Variable& k, const Variable& v,
                                      const AttentionOptions& o, const TokenLayout& layout, Communicator& cp,
                                      SpAttentionStats* stats) { return ring_attention(q, k, v, o, layout, cp, stats); };
inline const SpAttentionFn kAllGather = [](const Variable& q, const Variable& k, const Variable& v,
                                           const AttentionOptions& o, const TokenLayout& layout, Communicator& cp,
                                           SpAttentionStats* stats) {
  return allgather_attention(q, k, v, o, layout, cp, stats);
};

// The 1-rank attention op over the whole sequence (on the inputs' device) and
// its gradients of q, k, v, from a loss that uses both out and lse.
struct WholeSequenceAttention {
  Variable q, k, v;
  AttentionResult result;
};

inline WholeSequenceAttention whole_sequence_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                       const AttentionOptions& whole, const Tensor& dout,
                                                       const Tensor& dlse) {
  Variable gq(q, true), gk(k, true), gv(v, true);
  AttentionResult ref = attention(gq, gk, gv, whole);
  run_backward({ref.out, ref.lse}, {dout, dlse});
  return {gq, gk, gv, ref};
}

// This rank alone as a cp group of one (collective over the world).
inline std::unique_ptr<MpiCommunicator> self_group() {
  return mpi_context().world().split(mpi_context().world().rank(), 0, "cp");
}

struct SpCase {
  int cp = 2;
  LayoutKind layout = LayoutKind::zigzag;
  int64_t B = 2, T = 24, H = 2, Hkv = 2, D = 4;
  DType dtype = DType::f64;
  bool causal = true;
  S2Pattern s2;
  int64_t k_shift = 0;  // keys at positions + k_shift (k_shift > 0: the first rows see no key)
};

inline std::string case_name(const SpCase& c) {
  std::string name = "cp" + std::to_string(c.cp) + "_" + layout_kind_name(c.layout) + "_H" + std::to_string(c.H) +
                     "kv" + std::to_string(c.Hkv) + "_" + dtype_name(c.dtype);
  if (!c.causal) name += "_noncausal";
  if (c.s2.enabled()) name += "_s2b" + std::to_string(c.s2.block);
  if (c.k_shift != 0) name += "_kshift" + std::to_string(c.k_shift);
  return name;
}

// Tolerances: both sides are exact up to rounding, in a different summation order
// (worst seen: 1.4e-15 in f64, 1.4e-6 in f32).
inline double tolerance(DType dtype) { return dtype == DType::f64 ? 1e-13 : 1e-5; }

// Runs `fn` on the local shards of this rank of `group` and compares with the
// attention op over the whole sequence. Returns this rank's stats.
inline SpAttentionStats expect_matches_single_rank(const SpAttentionFn& fn, const SpCase& c, Communicator& group) {
  const int rank = group.rank();
  const Shape q_shape{c.B, c.T, c.H, c.D}, kv_shape{c.B, c.T, c.Hkv, c.D};
  // Same seeds on every rank: every rank holds the same global tensors.
  Tensor q = random_tensor(q_shape, 11, c.dtype), k = random_tensor(kv_shape, 12, c.dtype);
  Tensor v = random_tensor(kv_shape, 13, c.dtype);
  Tensor dout = random_tensor(q_shape, 14, c.dtype), dlse = random_tensor({c.B, c.H, c.T}, 15, c.dtype);
  Tensor k_positions = Tensor::arange(c.T, DType::i64);
  for (int64_t i = 0; i < c.T; ++i) k_positions.data<int64_t>()[i] += c.k_shift;

  AttentionOptions whole;
  whole.causal = c.causal;
  whole.s2 = c.s2;
  whole.k_positions = k_positions;
  const WholeSequenceAttention ref = whole_sequence_attention(q, k, v, whole, dout, dlse);

  TokenLayout layout(c.layout, c.T, c.cp);
  AttentionOptions local = whole;
  local.q_positions = layout.positions(rank);
  local.k_positions = layout.shard(k_positions, rank, 0);
  if (c.k_shift == 0) local.k_positions = Tensor();  // default: the query positions
  Variable lq(layout.shard(q, rank, 1), true), lk(layout.shard(k, rank, 1), true), lv(layout.shard(v, rank, 1), true);
  SpAttentionStats stats;
  AttentionResult got = fn(lq, lk, lv, local, layout, group, &stats);
  run_backward({got.out, got.lse}, {layout.shard(dout, rank, 1), layout.shard(dlse, rank, 2)});

  const double tol = tolerance(c.dtype);
  SCOPED_TRACE(case_name(c) + " rank " + std::to_string(rank));
  EXPECT_TENSOR_CLOSE(got.out.data(), layout.shard(ref.result.out.data(), rank, 1), tol, tol);
  EXPECT_TENSOR_CLOSE(got.lse.data(), layout.shard(ref.result.lse.data(), rank, 2), tol, tol);
  EXPECT_TENSOR_CLOSE(lq.grad(), layout.shard(ref.q.grad(), rank, 1), tol, tol);
  EXPECT_TENSOR_CLOSE(lk.grad(), layout.shard(ref.k.grad(), rank, 1), tol, tol);
  EXPECT_TENSOR_CLOSE(lv.grad(), layout.shard(ref.v.grad(), rank, 1), tol, tol);
  return stats;
}

// The cases every algorithm must get right: cp 2, 3, 4 (3 is odd on purpose),
// both layouts, plain / GQA / S2 (a block that straddles the chunk edges), f64 and f32.
inline std::vector<SpCase> equivalence_cases() {
  std::vector<SpCase> cases;
  for (int cp : {2, 3, 4})
    for (LayoutKind layout : {LayoutKind::zigzag, LayoutKind::contiguous})
      for (DType dtype : {DType::f64, DType::f32})
        for (int variant = 0; variant < 3; ++variant) {
          SpCase c;
          c.cp = cp;
          c.layout = layout;
          c.dtype = dtype;
          if (variant >= 1) c.H = 4;  // GQA: 4 query heads over 2 kv heads
          if (variant == 2) c.s2 = S2Pattern{5, 1, 3};  // block 5, 1 local block, vert_stride 3
          cases.push_back(c);
        }
  return cases;
}

// The forward and backward bytes one call of `fn` sends over `group` (f32, q
// with H heads, k and v with 2 heads of width 4, T tokens in the `kind`
// layout), checking that a CountingCommunicator around the group (the
// trainer's per-layer-type counter) sees the same bytes.
inline std::pair<int64_t, int64_t> bytes_sent(const SpAttentionFn& fn, Communicator& group, LayoutKind kind,
                                              int64_t T, int64_t H) {
  TokenLayout layout(kind, T, group.size());
  const int64_t Tl = layout.local_len();
  Variable q(random_tensor({1, Tl, H, 4}, 1, DType::f32), true), k(random_tensor({1, Tl, 2, 4}, 2, DType::f32), true);
  Variable v(random_tensor({1, Tl, 2, 4}, 3, DType::f32), true);
  SpAttentionStats stats;
  double counted = 0.0;
  CountingCommunicator counting(group, counted);
  AttentionResult r = fn(q, k, v, AttentionOptions{}, layout, counting, &stats);
  run_backward({r.out}, {Tensor::ones(r.out.shape(), DType::f32)});
  EXPECT_EQ(counted, static_cast<double>(stats.bytes_sent()));
  return {stats.forward_bytes_sent, stats.backward_bytes_sent};
}

// Non-causal attention (one block per step) and rows with no visible key at
// all (keys shifted 5 positions later: the first 5 queries see nothing): lse
// stays -inf, out 0, nothing NaN, gradients equal the 1-rank op's; cp 1, 2, 3.
inline void expect_noncausal_and_empty_rows_match(const SpAttentionFn& fn) {
  for (int cp : {1, 2, 3}) {
    std::unique_ptr<MpiCommunicator> group = first_ranks(cp);
    if (mpi_context().world_size() < cp || !group) continue;
    for (LayoutKind layout : {LayoutKind::zigzag, LayoutKind::contiguous}) {
      SpCase noncausal;
      noncausal.cp = cp;
      noncausal.layout = layout;
      noncausal.causal = false;
      expect_matches_single_rank(fn, noncausal, *group);
      SpCase empty = noncausal;
      empty.causal = true;
      empty.H = 4;
      empty.k_shift = 5;  // the first 5 queries see no key: lse -inf, out 0, no NaN
      for (DType dtype : {DType::f64, DType::f32}) {
        empty.dtype = dtype;
        expect_matches_single_rank(fn, empty, *group);
      }
    }
  }
}

// f64 finite-difference gradient check of `fn` on one rank (out and lse), both
// layouts, dense and S2, GQA, non-contiguous q and v.
inline void expect_gradcheck_one_rank(const SpAttentionFn& sp_fn) {
  std::unique_ptr<MpiCommunicator> self = self_group();
  for (LayoutKind kind : {LayoutKind::zigzag, LayoutKind::contiguous}) {
    TokenLayout layout(kind, 6, 1);
    for (bool s2 : {false, true}) {
      AttentionOptions o;
      if (s2) o.s2 = S2Pattern{2, 1, 2};
      auto fn = [&](const std::vector<Variable>& in) {
        AttentionResult r = sp_fn(in[0], in[1], in[2], o, layout, *self, nullptr);
        return std::vector<Variable>{r.out, r.lse};
      };
      EXPECT_GRADCHECK(fn, {non_contiguous(random_tensor({2, 6, 4, 3}, 1)), random_tensor({2, 6, 2, 3}, 2),
                            non_contiguous(random_tensor({2, 6, 2, 3}, 3))});
    }
  }
}

}  // namespace loom::testing
