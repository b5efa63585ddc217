// MoE dispatch ops: row gather / scatter-add (values, repeated indices,
// gradients on non-contiguous inputs, bad indices), grouped linear,
// log-sum-exp, top-k.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "framework/ops.h"
#include "framework/ops_moe.h"
#include "tests/testing.h"

namespace loom {
namespace {

Tensor index_of(const std::vector<int64_t>& v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); }

TEST(OpsMoe, IndexSelectRowsGathersRows) {
  Tensor x = Tensor::from_vector(std::vector<double>{0, 1, 10, 11, 20, 21}, {3, 2});
  Variable y = index_select_rows(Variable(x), index_of({2, 0, 2}));
  EXPECT_EQ(y.data().to_vector<double>(), (std::vector<double>{20, 21, 0, 1, 20, 21}));
  try {
    index_select_rows(Variable(x), index_of({1, 3}));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("index 3 at position 1"), std::string::npos) << e.what();
  }
}

TEST(OpsMoe, IndexAddRowsAddsRepeatedIndices) {
  Tensor rows = Tensor::from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {3, 2});
  Variable y = index_add_rows(Variable(rows), index_of({1, 3, 1}), 4);
  EXPECT_EQ(y.data().to_vector<double>(), (std::vector<double>{0, 0, 6, 8, 0, 0, 3, 4}));
  EXPECT_THROW(index_add_rows(Variable(rows), index_of({0, 1}), 4), Error);  // one index per row
}

TEST(OpsMoe, RowOpGradientsMatchFiniteDifferencesOnNonContiguousInputs) {
  Tensor x = testing::non_contiguous(testing::random_tensor({5, 3}, 1));
  Tensor index = index_of({4, 0, 4, 2, 2, 2, 1});  // repeats, and row 3 unused
  ASSERT_FALSE(x.is_contiguous());
  EXPECT_GRADCHECK([&](const std::vector<Variable>& in) { return std::vector<Variable>{index_select_rows(in[0], index)}; },
                   {x});
  Tensor rows = testing::non_contiguous(testing::random_tensor({7, 3}, 2));
  EXPECT_GRADCHECK([&](const std::vector<Variable>& in) { return std::vector<Variable>{index_add_rows(in[0], index, 5)}; },
                   {rows});
  // A transposed view (column-major rows) through both ops in a chain.
  Tensor xt = testing::random_tensor({3, 5}, 3).transpose(0, 1);
  EXPECT_GRADCHECK(
      [&](const std::vector<Variable>& in) {
        return std::vector<Variable>{index_add_rows(index_select_rows(in[0], index), index_of({0, 1, 0, 1, 0, 1, 0}), 2)};
      },
      {xt});
}

TEST(OpsMoe, GroupedLinearMatchesPerGroupLinear) {
  Tensor x = testing::random_tensor({7, 5}, 7);     // (S, In)
  Tensor w = testing::random_tensor({4, 3, 5}, 8);  // (E, Out, In)
  std::vector<int64_t> offsets = {0, 2, 2, 7, 7};   // experts 1 and 3 get no rows
  Tensor y = grouped_linear(Variable(x), Variable(w), offsets).data();
  ASSERT_EQ(y.shape(), (Shape{7, 3}));
  for (int64_t e = 0; e < 4; ++e) {
    int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    Tensor want = linear(Variable(x.narrow(0, offsets[e], n)), Variable(w.select(0, e))).data();
    EXPECT_TENSOR_CLOSE(y.narrow(0, offsets[e], n), want, 1e-14, 1e-14) << "expert " << e;
  }
  EXPECT_THROW(grouped_linear(Variable(x), Variable(w), {0, 2, 1, 7, 7}), Error);  // decreasing
  EXPECT_THROW(grouped_linear(Variable(x), Variable(w), {0, 2, 7}), Error);        // wrong count
  Tensor xn = testing::non_contiguous(x), wn = testing::non_contiguous(w);
  ASSERT_FALSE(xn.is_contiguous() || wn.is_contiguous());
  EXPECT_GRADCHECK(
      [&](const std::vector<Variable>& in) { return std::vector<Variable>{grouped_linear(in[0], in[1], offsets)}; },
      {xn, wn});
  EXPECT_GRADCHECK(  // transposed x, one group holding all rows
      [&](const std::vector<Variable>& in) {
        return std::vector<Variable>{grouped_linear(in[0], in[1], {0, 0, 0, 7, 7})};
      },
      {testing::random_tensor({5, 7}, 9).transpose(0, 1), w});
}

TEST(OpsMoe, LogSumExpMatchesNaiveAndIsStable) {
  Tensor x = testing::random_tensor({2, 3, 4}, 4);
  Variable lse = logsumexp(Variable(x));
  ASSERT_EQ(lse.shape(), (Shape{2, 3}));
  std::vector<double> xv = x.to_vector<double>(), lv = lse.data().to_vector<double>();
  for (int r = 0; r < 6; ++r) {
    double s = 0;
    for (int j = 0; j < 4; ++j) s += std::exp(xv[r * 4 + j]);
    EXPECT_NEAR(lv[r], std::log(s), 1e-12);
  }
  Tensor big = Tensor::from_vector(std::vector<double>{1000, 1000, -1000}, {1, 3});
  EXPECT_NEAR(logsumexp(Variable(big)).data().to_vector<double>()[0], 1000 + std::log(2.0), 1e-9);
  Tensor xn = testing::non_contiguous(testing::random_tensor({3, 5}, 5));
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{logsumexp(in[0])}; }, {xn});
  Tensor x3 = testing::random_tensor({3, 1, 5}, 6).transpose(0, 2);  // (5, 1, 3), non-contiguous
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{logsumexp(in[0])}; }, {x3});
}

TEST(OpsMoe, TopKIsDescendingWithTiesToTheLowerColumn) {
  Tensor s = Tensor::from_vector(std::vector<double>{0.1, 0.5, 0.5, 0.2, 3, 1, 2, 3}, {2, 4});
  EXPECT_EQ(topk_indices(s, 3).to_vector<int64_t>(), (std::vector<int64_t>{1, 2, 3, 0, 3, 2}));
  EXPECT_EQ(topk_indices(s.to(DType::f32), 1).to_vector<int64_t>(), (std::vector<int64_t>{1, 0}));
  EXPECT_THROW(topk_indices(s, 5), Error);
  Tensor nan = Tensor::from_vector(std::vector<double>{0.1, std::nan("")}, {1, 2});
  EXPECT_THROW(topk_indices(nan, 1), Error);
}

TEST(OpsMoe, TopKMaskMarksTheTopKWithTiesToTheLowerColumnAndNanLast) {
  const double nan = std::nan("");
  Tensor s = Tensor::from_vector(std::vector<double>{0.1, 0.5, 0.5, 0.2, 3, 1, 2, 3, nan, -INFINITY, nan, 0}, {3, 4});
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor m = topk_mask(s.to(dt), 2);
    EXPECT_EQ(m.dtype(), dt);
    // Row 0: the tie at 0.5 both picked; row 1: 3 (column 0) and 3 (column 3);
    // row 2: the numbers before the NaNs, 0 then -inf.
    EXPECT_EQ(m.to_vector<double>(), (std::vector<double>{0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1})) << dt;
  }
  // k = 3: row 0 takes 0.2 next; row 1 the 2; row 2 the first NaN (lower column).
  EXPECT_EQ(topk_mask(s, 3).to_vector<double>(), (std::vector<double>{0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1}));
  EXPECT_EQ(topk_mask(s, 1).to_vector<double>(), (std::vector<double>{0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1}));
  EXPECT_THROW(topk_mask(s, 5), Error);
  EXPECT_THROW(topk_mask(s, 0), Error);
  // The mask marks what topk_indices picks (no NaN): random rows with coarse ties.
  Tensor r = testing::random_indices({40, 12}, 4, 31).to(DType::f64);
  std::vector<int64_t> idx = topk_indices(r, 5).to_vector<int64_t>();
  std::vector<double> want(40 * 12, 0.0);
  for (int64_t i = 0; i < 40; ++i)
    for (int64_t j = 0; j < 5; ++j) want[static_cast<size_t>(i * 12 + idx[static_cast<size_t>(i * 5 + j)])] = 1;
  EXPECT_EQ(topk_mask(r, 5).to_vector<double>(), want);
}

#define EXPECT_THAT_TEXT(text, part) EXPECT_NE((text).find(part), std::string::npos) << (text)

// The composed ops MoH ran before moh_gate (models/softmax_attention_moh.cpp), as the oracle.
Variable composed_moh_gate(const Variable& p, const Tensor& mask, const Variable& z, int64_t shared, int64_t k) {
  Variable kept = mul(p, Variable(mask));
  Variable g_r = scale(div(kept, sum(kept, 1, true)), static_cast<double>(k));
  if (shared == 0) return g_r;
  const int64_t hs = shared > 1 ? shared : 0, n = p.size(0);
  Variable g_s = hs > 0 ? scale(softmax(narrow(z, 1, 0, hs), -1), static_cast<double>(hs))
                        : Variable(Tensor::ones({n, 1}, p.dtype()));
  Variable alpha = scale(softmax(narrow(z, 1, hs, 2), -1), 2.0);
  return concat({mul(narrow(alpha, 1, 0, 1), g_s), mul(narrow(alpha, 1, 1, 1), g_r)}, 1);
}

// moh_gate equals the composed ops (values and both gradients) with 0, 1 and 3
// shared heads, and passes finite differences on p and z (the mask constant).
TEST(OpsMoe, MohGateMatchesTheComposedOpsAndFiniteDifferences) {
  const int64_t n = 9, e = 6, k = 2;
  for (int64_t shared : {0, 1, 3}) {
    SCOPED_TRACE(::testing::Message() << "shared " << shared);
    const int64_t zc = shared > 0 ? (shared > 1 ? shared : 0) + 2 : 0;
    Tensor p = softmax(Variable(testing::random_tensor({n, e}, 60 + shared)), -1).data();  // rows sum to 1
    Tensor mask = topk_mask(p, k);
    Tensor z = shared > 0 ? testing::random_tensor({n, zc}, 70 + shared) : Tensor();
    Tensor dgate = testing::random_tensor({n, shared + e}, 80 + shared);
    Variable p1(p, true), z1 = shared > 0 ? Variable(z, true) : Variable();
    Variable p2(p, true), z2 = shared > 0 ? Variable(z, true) : Variable();
    Variable fused = moh_gate(p1, mask, z1, shared, k), ref = composed_moh_gate(p2, mask, z2, shared, k);
    EXPECT_TENSOR_CLOSE(fused.data(), ref.data(), 1e-13, 1e-14) << "gate";
    fused.backward(dgate);
    ref.backward(dgate);
    EXPECT_TENSOR_CLOSE(p1.grad(), p2.grad(), 1e-12, 1e-13) << "dp";
    if (shared > 0) {
      EXPECT_TENSOR_CLOSE(z1.grad(), z2.grad(), 1e-12, 1e-13) << "dz";
      EXPECT_GRADCHECK(
          [&](const std::vector<Variable>& in) { return std::vector<Variable>{moh_gate(in[0], mask, in[1], shared, k)}; },
          {p, z});
    } else {
      EXPECT_GRADCHECK(
          [&](const std::vector<Variable>& in) { return std::vector<Variable>{moh_gate(in[0], mask, Variable(), 0, k)}; },
          {p});
    }
  }
  // Named errors: z missing for shared heads, a z of the wrong width, k past E.
  Tensor p = softmax(Variable(testing::random_tensor({3, 4}, 90)), -1).data();
  Tensor mask = topk_mask(p, 2);
  auto message = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_THAT_TEXT(message([&] { moh_gate(Variable(p), mask, Variable(), 2, 2); }), "2 shared heads");
  EXPECT_THAT_TEXT(message([&] { moh_gate(Variable(p), mask, Variable(testing::random_tensor({3, 3}, 91)), 2, 2); }),
                   "(3, 4)");
  EXPECT_THAT_TEXT(message([&] { moh_gate(Variable(p), mask, Variable(), 0, 5); }), "k = 5");
}

}  // namespace
}  // namespace loom
