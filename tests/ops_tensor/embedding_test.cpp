// embedding: gathered rows for i64 and i32 ids of any shape, scatter-add
// gradients (repeated ids accumulate, deterministically), errors naming the
// bad id, V and the dtype.
#include <gtest/gtest.h>

#include "framework/ops_tensor.h"
#include "tests/ops_tensor/reference.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::non_contiguous;
using testing::random_indices;
using testing::random_tensor;

TEST(Embedding, GathersRowsForAnyIdShape) {
  Tensor w = random_tensor({17, 3}, 1);
  std::vector<double> wv = w.to_vector<double>();
  Tensor ids = random_indices({3, 5}, 17, 2);
  Variable out = embedding(Variable(w), ids);
  EXPECT_EQ(out.shape(), (Shape{3, 5, 3}));
  std::vector<int64_t> iv = ids.to_vector<int64_t>();
  std::vector<double> expected;
  for (int64_t id : iv)
    for (int64_t c = 0; c < 3; ++c) expected.push_back(wv[id * 3 + c]);
  EXPECT_EQ(out.data().to_vector<double>(), expected);
  // i32 ids, a non-contiguous table, f32.
  Variable out32 = embedding(Variable(non_contiguous(w)), ids.to(DType::i32));
  EXPECT_EQ(out32.data().to_vector<double>(), expected);
  Variable f = embedding(Variable(w.to(DType::f32)), ids);
  EXPECT_EQ(f.dtype(), DType::f32);
  // 0-d ids give one row (C).
  Variable one = embedding(Variable(w), Tensor::scalar(4, DType::i64));
  EXPECT_EQ(one.shape(), (Shape{3}));
  EXPECT_EQ(one.data().to_vector<double>(), (std::vector<double>{wv[12], wv[13], wv[14]}));
}

TEST(Embedding, GradientsScatterAdd) {
  Tensor ids = random_indices({65}, 17, 3);  // 65 ids over 17 rows: many repeats
  EXPECT_GRADCHECK([ids](const std::vector<Variable>& in) { return std::vector<Variable>{embedding(in[0], ids)}; },
                   {random_tensor({17, 3}, 4)});
  Tensor ids2 = random_indices({3, 5}, 3, 5).to(DType::i32);
  EXPECT_GRADCHECK([ids2](const std::vector<Variable>& in) { return std::vector<Variable>{embedding(in[0], ids2)}; },
                   {non_contiguous(random_tensor({3, 17}, 6))});
}

TEST(Embedding, RepeatedIdsAccumulateExactly) {
  Variable w(Tensor::zeros({5, 2}, DType::f64), true);
  Tensor ids = Tensor::from_vector<int64_t>({3, 0, 3, 3}, {4});
  Variable out = embedding(w, ids);  // (4, 2)
  out.backward(Tensor::from_vector<double>({1, 2, 10, 20, 100, 200, 1000, 2000}, {4, 2}));
  EXPECT_EQ(w.grad().to_vector<double>(), (std::vector<double>{10, 20, 0, 0, 0, 0, 1101, 2202, 0, 0}));
  // The ids were copied at the call: changing them afterwards does not move the gradient.
  Variable w2(Tensor::zeros({5, 2}, DType::f64), true);
  Tensor mutable_ids = Tensor::from_vector<int64_t>({1}, {1});
  Variable out2 = embedding(w2, mutable_ids);
  mutable_ids.fill_(4);
  out2.backward(Tensor::ones({1, 2}, DType::f64));
  EXPECT_EQ(w2.grad().to_vector<double>()[2], 1.0);
  EXPECT_EQ(w2.grad().to_vector<double>()[8], 0.0);
}

TEST(Embedding, ErrorsNameIdsVocabAndDtype) {
  Variable w(Tensor::zeros({10, 4}, DType::f64));
  EXPECT_ERROR_MENTIONS(embedding(w, Tensor::from_vector<int64_t>({1, 12, 3}, {3})), "embedding", "id 12",
                        "[0, 10)");
  EXPECT_ERROR_MENTIONS(embedding(w, Tensor::from_vector<int32_t>({-1}, {1})), "embedding", "id -1", "[0, 10)");
  EXPECT_ERROR_MENTIONS(embedding(w, Tensor::zeros({3}, DType::f32)), "embedding", "i64", "f32");
  EXPECT_ERROR_MENTIONS(embedding(Variable(Tensor::zeros({10}, DType::f64)), Tensor::zeros({3}, DType::i64)),
                        "embedding", "(10,)");
  EXPECT_ERROR_MENTIONS(embedding(w, Tensor()), "embedding", "undefined");
}

}  // namespace
}  // namespace loom
