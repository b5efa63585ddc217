// attention: forward (out and lse) against explicit scores + mask + softmax
// loops; causal by global positions and full; GQA; T != S and T = 1; empty
// rows (out 0, lse -inf, zero gradients, never NaN); gradients of both outputs
// by finite differences (non-contiguous inputs included); errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "framework/ops_nn.h"
#include "kernels/cpu/attention.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::GradCheckOptions;
using testing::non_contiguous;
using testing::random_tensor;
using testing::values;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct Reference {
  Tensor out, lse;
};

// Scores s * q.k for every (b, h, i, j), masked where kpos[j] > qpos[i] (causal),
// softmax by exp / sum (no max subtraction: inputs are small), then p v.
Reference naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, std::vector<int64_t> qpos,
                          std::vector<int64_t> kpos, bool causal, double scale = 0.0) {
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), S = k.size(1), Hkv = k.size(2);
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(D));
  if (qpos.empty())
    for (int64_t i = 0; i < T; ++i) qpos.push_back(i);
  if (kpos.empty())
    for (int64_t j = 0; j < S; ++j) kpos.push_back(j);
  std::vector<double> qv = values(q), kv = values(k), vv = values(v);
  std::vector<double> out(B * T * H * D, 0.0), lse(B * H * T, kNegInf);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        int64_t hk = h / (H / Hkv);
        std::vector<double> weight(S, 0.0);
        double total = 0.0;
        for (int64_t j = 0; j < S; ++j) {
          if (causal && kpos[j] > qpos[i]) continue;
          double score = 0.0;
          for (int64_t d = 0; d < D; ++d)
            score += qv[((b * T + i) * H + h) * D + d] * kv[((b * S + j) * Hkv + hk) * D + d];
          weight[j] = std::exp(scale * score);
          total += weight[j];
        }
        if (total == 0.0) continue;  // empty row
        lse[(b * H + h) * T + i] = std::log(total);
        for (int64_t j = 0; j < S; ++j)
          for (int64_t d = 0; d < D; ++d)
            out[((b * T + i) * H + h) * D + d] += weight[j] / total * vv[((b * S + j) * Hkv + hk) * D + d];
      }
  return {Tensor::from_vector(out, {B, T, H, D}), Tensor::from_vector(lse, {B, H, T})};
}

// lse tensors agree: -inf exactly where expected, finite entries within tol.
::testing::AssertionResult lse_close(const Tensor& actual, const Tensor& expected, double tol) {
  std::vector<double> a = values(actual), e = values(expected);
  if (a.size() != e.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << e.size();
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(e[i]) || std::isinf(a[i])) {
      if (a[i] != e[i]) return ::testing::AssertionFailure() << "lse[" << i << "] = " << a[i] << ", expected " << e[i];
      a[i] = e[i] = 0.0;
    }
  }
  return testing::tensors_close(Tensor::from_vector(a, actual.shape()), Tensor::from_vector(e, expected.shape()), tol,
                                tol);
}

AttentionOptions options_with(bool causal, const std::vector<int64_t>& qpos = {},
                              const std::vector<int64_t>& kpos = {}) {
  AttentionOptions o;
  o.causal = causal;
  if (!qpos.empty()) o.q_positions = Tensor::from_vector(qpos, {static_cast<int64_t>(qpos.size())});
  if (!kpos.empty()) o.k_positions = Tensor::from_vector(kpos, {static_cast<int64_t>(kpos.size())});
  return o;
}

void expect_matches_reference(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<int64_t>& qpos,
                              const std::vector<int64_t>& kpos, bool causal, double tol = 1e-12) {
  AttentionResult r = attention(Variable(q), Variable(k), Variable(v), options_with(causal, qpos, kpos));
  Reference ref = naive_attention(q, k, v, qpos, kpos, causal);
  EXPECT_EQ(r.out.shape(), q.shape());
  EXPECT_EQ(r.lse.shape(), (Shape{q.size(0), q.size(2), q.size(1)}));
  EXPECT_EQ(r.lse.dtype(), q.dtype());
  EXPECT_TENSOR_CLOSE(r.out.data(), ref.out, tol, tol);
  EXPECT_TRUE(lse_close(r.lse.data(), ref.lse, tol));
}

// lse with -inf entries replaced by 0, gradient passed through where finite:
// keeps a gradcheck objective finite when some rows are empty.
Variable finite_part(const Variable& lse) {
  std::vector<double> v = values(lse.data()), mask(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    mask[i] = std::isfinite(v[i]) ? 1.0 : 0.0;
    if (mask[i] == 0.0) v[i] = 0.0;
  }
  Tensor mask_t = Tensor::from_vector(mask, lse.shape());
  return make_output(Tensor::from_vector(v, lse.shape()), {lse}, "FinitePart", [mask_t](const std::vector<Tensor>& g) {
    std::vector<double> gv = values(g[0]), m = values(mask_t);
    for (size_t i = 0; i < gv.size(); ++i) gv[i] *= m[i];
    return std::vector<Tensor>{Tensor::from_vector(gv, mask_t.shape())};
  });
}

using testing::attention_tolerance;

TEST(Attention, CausalForwardMatchesReference) {
  // T = S, GQA ratio 2 and 1.
  expect_matches_reference(random_tensor({2, 17, 4, 5}, 1), random_tensor({2, 17, 2, 5}, 2),
                           random_tensor({2, 17, 2, 5}, 3), {}, {}, true);
  expect_matches_reference(random_tensor({1, 3, 3, 4}, 4), random_tensor({1, 3, 3, 4}, 5),
                           random_tensor({1, 3, 3, 4}, 6), {}, {}, true);
}

TEST(Attention, FullForwardMatchesReference) {
  // T != S, GQA ratio 4 (one kv head).
  expect_matches_reference(random_tensor({2, 3, 4, 8}, 7), random_tensor({2, 17, 1, 8}, 8),
                           random_tensor({2, 17, 1, 8}, 9), {}, {}, false);
}

TEST(Attention, CausalByGlobalPositions) {
  // Queries are the last chunk of a sequence (ring-attention style offsets), keys a mix of chunks.
  expect_matches_reference(random_tensor({1, 3, 2, 4}, 10), random_tensor({1, 5, 2, 4}, 11),
                           random_tensor({1, 5, 2, 4}, 12), {20, 21, 22}, {0, 1, 21, 22, 23}, true);
  // T = 1 (decoding): one query at position 16 sees all 17 keys; at position 4, five.
  expect_matches_reference(random_tensor({1, 1, 2, 3}, 13), random_tensor({1, 17, 2, 3}, 14),
                           random_tensor({1, 17, 2, 3}, 15), {16}, {}, true);
  expect_matches_reference(random_tensor({1, 1, 2, 3}, 13), random_tensor({1, 17, 2, 3}, 14),
                           random_tensor({1, 17, 2, 3}, 15), {4}, {}, true);
}

TEST(Attention, CustomScaleAndFloat32) {
  Tensor q = random_tensor({1, 5, 2, 4}, 16), k = random_tensor({1, 7, 1, 4}, 17), v = random_tensor({1, 7, 1, 4}, 18);
  AttentionOptions o = options_with(false);
  o.scale = 0.3;
  AttentionResult r = attention(Variable(q), Variable(k), Variable(v), o);
  Reference ref = naive_attention(q, k, v, {}, {}, false, 0.3);
  EXPECT_TENSOR_CLOSE(r.out.data(), ref.out, 1e-12, 1e-12);
  EXPECT_TRUE(lse_close(r.lse.data(), ref.lse, 1e-12));
  AttentionResult r32 = attention(Variable(q.to(DType::f32)), Variable(k.to(DType::f32)), Variable(v.to(DType::f32)),
                                  options_with(true));
  Reference ref32 = naive_attention(q, k, v, {}, {}, true);
  EXPECT_EQ(r32.out.dtype(), DType::f32);
  EXPECT_TENSOR_CLOSE(r32.out.data(), ref32.out, 1e-5, 1e-5);
  EXPECT_TRUE(lse_close(r32.lse.data(), ref32.lse, 1e-5));
}

TEST(Attention, GqaEqualsRepeatedKvHeads) {
  Tensor q = random_tensor({1, 5, 4, 3}, 19), k = random_tensor({1, 5, 2, 3}, 20), v = random_tensor({1, 5, 2, 3}, 21);
  // Repeat each kv head twice: head h of (1, 5, 4, 3) is kv head h / 2.
  auto repeat = [](const Tensor& t) {
    std::vector<double> src = values(t), dst;
    for (int64_t j = 0; j < 5; ++j)
      for (int64_t h = 0; h < 4; ++h)
        for (int64_t d = 0; d < 3; ++d) dst.push_back(src[(j * 2 + h / 2) * 3 + d]);
    return Tensor::from_vector(dst, {1, 5, 4, 3});
  };
  AttentionResult gqa = attention(Variable(q), Variable(k), Variable(v), options_with(true));
  AttentionResult mha = attention(Variable(q), Variable(repeat(k)), Variable(repeat(v)), options_with(true));
  EXPECT_TENSOR_CLOSE(gqa.out.data(), mha.out.data(), 1e-14, 1e-14);
  EXPECT_TENSOR_CLOSE(gqa.lse.data(), mha.lse.data(), 1e-14, 1e-14);
}

TEST(Attention, EmptyRowsGiveZeroOutputMinusInfLseAndZeroGradients) {
  // Query positions 0 and 1 see no key (keys start at 3); position 5 sees two.
  Tensor q = random_tensor({1, 3, 2, 3}, 22), k = random_tensor({1, 4, 1, 3}, 23), v = random_tensor({1, 4, 1, 3}, 24);
  AttentionOptions o = options_with(true, {0, 5, 1}, {3, 4, 6, 8});
  Variable qv(q, true), kv(k, true), vv(v, true);
  AttentionResult r = attention(qv, kv, vv, o);
  std::vector<double> out = values(r.out.data()), lse = values(r.lse.data());
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t i : {0, 2}) {
      EXPECT_EQ(lse[h * 3 + i], kNegInf);
      for (int64_t d = 0; d < 3; ++d) EXPECT_EQ(out[(i * 2 + h) * 3 + d], 0.0);
    }
    EXPECT_TRUE(std::isfinite(lse[h * 3 + 1]));
  }
  for (double x : out) EXPECT_FALSE(std::isnan(x));
  Reference ref = naive_attention(q, k, v, {0, 5, 1}, {3, 4, 6, 8}, true);
  EXPECT_TENSOR_CLOSE(r.out.data(), ref.out, 1e-12, 1e-12);
  EXPECT_TRUE(lse_close(r.lse.data(), ref.lse, 1e-12));
  // Gradients flowing into both outputs (also into the -inf lse entries) stay finite, and are zero on empty rows.
  run_backward({r.out, r.lse}, {Tensor::ones(q.shape(), DType::f64), Tensor::ones({1, 2, 3}, DType::f64)});
  std::vector<double> dq = values(qv.grad());
  for (double g : dq) EXPECT_TRUE(std::isfinite(g));
  for (double g : values(kv.grad())) EXPECT_TRUE(std::isfinite(g));
  for (double g : values(vv.grad())) EXPECT_TRUE(std::isfinite(g));
  for (int64_t i : {0, 2})
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t d = 0; d < 3; ++d) EXPECT_EQ(dq[(i * 2 + h) * 3 + d], 0.0);
  // Keys 6 and 8 are seen by no query: no gradient.
  std::vector<double> dk = values(kv.grad()), dv = values(vv.grad());
  for (int64_t j : {2, 3})
    for (int64_t d = 0; d < 3; ++d) {
      EXPECT_EQ(dk[j * 3 + d], 0.0);
      EXPECT_EQ(dv[j * 3 + d], 0.0);
    }
}

TEST(Attention, GradCheckCausalGqa) {
  // T = S = 17, H = 4, Hkv = 2; both outputs checked (the lse gradient included).
  auto fn = [](const std::vector<Variable>& in) {
    AttentionResult r = attention(in[0], in[1], in[2], AttentionOptions{});
    return std::vector<Variable>{r.out, r.lse};
  };
  EXPECT_GRADCHECK(fn, {random_tensor({1, 17, 4, 3}, 25), random_tensor({1, 17, 2, 3}, 26),
                        random_tensor({1, 17, 2, 3}, 27)},
                   attention_tolerance());
}

TEST(Attention, GradCheckFullNonContiguous) {
  // Full attention, T = 3 != S = 17, B = 2, one kv head; k and v are strided views.
  auto fn = [](const std::vector<Variable>& in) {
    AttentionResult r = attention(in[0], in[1], in[2], options_with(false));
    return std::vector<Variable>{r.out, r.lse};
  };
  EXPECT_GRADCHECK(fn, {random_tensor({2, 3, 2, 5}, 28), non_contiguous(random_tensor({2, 17, 1, 5}, 29)),
                        random_tensor({2, 5, 17, 1}, 30).permute({0, 2, 3, 1})},
                   attention_tolerance());
}

TEST(Attention, GradCheckSingleQueryNonContiguous) {
  // T = 1 at global position 9 against 17 keys (10 visible), GQA ratio 1, q non-contiguous.
  auto fn = [](const std::vector<Variable>& in) {
    AttentionResult r = attention(in[0], in[1], in[2], options_with(true, {9}));
    return std::vector<Variable>{r.out, r.lse};
  };
  EXPECT_GRADCHECK(fn, {non_contiguous(random_tensor({1, 1, 3, 4}, 31)), random_tensor({1, 17, 3, 4}, 32),
                        random_tensor({1, 17, 3, 4}, 33)},
                   attention_tolerance());
}

TEST(Attention, GradCheckEmptyRows) {
  auto fn = [](const std::vector<Variable>& in) {
    AttentionResult r = attention(in[0], in[1], in[2], options_with(true, {0, 5, 1}, {3, 4, 6, 8}));
    return std::vector<Variable>{r.out, finite_part(r.lse)};
  };
  EXPECT_GRADCHECK(fn, {random_tensor({1, 3, 2, 3}, 34), random_tensor({1, 4, 1, 3}, 35),
                        random_tensor({1, 4, 1, 3}, 36)},
                   attention_tolerance());
}

TEST(Attention, GradCheckEachOutputAlone) {
  // Only out used (lse gradient undefined), then only lse used (out gradient undefined).
  auto out_only = [](const std::vector<Variable>& in) {
    return std::vector<Variable>{attention(in[0], in[1], in[2], AttentionOptions{}).out};
  };
  auto lse_only = [](const std::vector<Variable>& in) {
    return std::vector<Variable>{attention(in[0], in[1], in[2], options_with(false)).lse};
  };
  std::vector<Tensor> inputs = {random_tensor({1, 5, 4, 3}, 37), random_tensor({1, 5, 1, 3}, 38),
                                random_tensor({1, 5, 1, 3}, 39)};
  EXPECT_GRADCHECK(out_only, inputs, attention_tolerance());
  EXPECT_GRADCHECK(lse_only, inputs, attention_tolerance());
}

TEST(Attention, ThreadedPath) {
  // Large enough for the kernels' threaded paths: forward against the reference, sampled gradients.
  Tensor q = random_tensor({2, 33, 4, 16}, 40);                                      // (B, T, H, D)
  Tensor k = random_tensor({2, 29, 2, 16}, 41), v = random_tensor({2, 29, 2, 16}, 42);  // (B, S, Hkv, D)
  std::vector<int64_t> qpos;
  for (int64_t i = 0; i < 33; ++i) qpos.push_back(i + 2);
  expect_matches_reference(q, k, v, qpos, {}, true);
  auto fn = [&](const std::vector<Variable>& in) {
    AttentionResult r = attention(in[0], in[1], in[2], options_with(true, qpos));
    return std::vector<Variable>{r.out, r.lse};
  };
  EXPECT_TRUE(testing::spot_gradcheck(fn, {q, k, v}, 6, 43));
}

TEST(Attention, ErrorsNameTheValues) {
  Variable q(random_tensor({1, 3, 4, 3}, 1)), k(random_tensor({1, 5, 3, 3}, 2)), v(random_tensor({1, 5, 3, 3}, 3));
  EXPECT_ERROR_MENTIONS(attention(q, k, v, AttentionOptions{}), {"attention", "H = 4", "Hkv = 3"});
  Variable k2(random_tensor({1, 5, 2, 3}, 4)), v4(random_tensor({1, 5, 2, 4}, 5));
  EXPECT_ERROR_MENTIONS(attention(q, k2, v4, AttentionOptions{}), {"attention", "(1, 5, 2, 3)", "(1, 5, 2, 4)"});
  Variable k4(random_tensor({1, 5, 2, 4}, 6));
  EXPECT_ERROR_MENTIONS(attention(q, k4, v4, AttentionOptions{}), {"attention", "(1, 3, 4, 3)", "(1, 5, 2, 4)"});
  Variable kb(random_tensor({2, 5, 2, 3}, 7));
  EXPECT_ERROR_MENTIONS(attention(q, kb, kb, AttentionOptions{}), {"attention", "(1, 3, 4, 3)", "(2, 5, 2, 3)"});
  EXPECT_ERROR_MENTIONS(attention(q, k2, k2, options_with(true, {0, 1, 2, 3, 4})),
                        {"attention", "q_positions", "(5,)", "(3,)"});
  AttentionOptions float_positions;
  float_positions.k_positions = Tensor::zeros({5}, DType::f64);
  EXPECT_ERROR_MENTIONS(attention(q, k2, k2, float_positions), {"attention", "k_positions", "f64"});
  Variable k32(random_tensor({1, 5, 2, 3}, 8, DType::f32));
  EXPECT_ERROR_MENTIONS(attention(q, k32, k32, AttentionOptions{}), {"attention", "f64", "f32"});
  Variable q3(random_tensor({3, 4, 3}, 9));
  EXPECT_ERROR_MENTIONS(attention(q3, k2, k2, AttentionOptions{}), {"attention", "(3, 4, 3)"});
}

TEST(AttentionMaskForm, FindsTheDiagonalThePositionsMake) {
  auto form = [](std::vector<int64_t> q, std::vector<int64_t> k, bool causal = true) {
    return cpu::mask_form(q.data(), static_cast<int64_t>(q.size()), k.data(), static_cast<int64_t>(k.size()), causal);
  };
  using F = cpu::MaskForm;
  EXPECT_EQ(form({0, 1, 2, 3}, {0, 1, 2, 3}), F::diagonal(0));           // causal, one start
  EXPECT_EQ(form({5, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7}), F::diagonal(5));  // queries are the last keys
  EXPECT_EQ(form({8, 9}, {0, 1, 2}), F::diagonal(3));                    // every key before every query
  EXPECT_EQ(form({3, 2}, {0, 1}), F::diagonal(2));                       // ... in any order
  EXPECT_EQ(form({0, 1}, {5, 3}, false), F::diagonal(2));                // not causal: nothing masked
  EXPECT_EQ(form({4, 5, 6, 7}, {0, 1, 4, 5, 6, 7}), F::diagonal(2));     // zigzag diagonal step: chunks 0 and 2
  EXPECT_EQ(form({0, 1}, {0, 2}), F::positions());                       // a gap inside the diagonal
  EXPECT_EQ(form({1, 3}, {0, 1, 2, 3}), F::positions());                 // queries not consecutive
  EXPECT_EQ(form({0, 1, 2}, {1, 2, 3}), F::positions());                 // row 0 sees nothing
  EXPECT_EQ(form({3, 4}, {4, 3, 2}), F::positions());                    // keys not ascending
}

}  // namespace
}  // namespace loom
