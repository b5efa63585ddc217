// matmul (batched, broadcast batch dims, transposed and strided inputs) and
// linear: values against a triple loop, finite-difference gradients on odd
// shapes, errors naming the shapes.
#include <gtest/gtest.h>

#include "framework/ops_tensor.h"
#include "framework/stream.h"
#include "kernels/cpu/matmul.h"
#include "tests/ops_tensor/reference.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::non_contiguous;
using testing::random_tensor;
using testing::reference_matmul;

std::vector<Variable> matmul_of(const std::vector<Variable>& in) { return {matmul(in[0], in[1])}; }

TEST(Matmul, ValuesMatchTripleLoop) {
  struct Case {
    Shape a, b;
  };
  // 2-D; b without batch (one stacked GEMM); both batched; broadcast on both sides; a 2-D with b batched; M = 1.
  for (const Case& c : std::vector<Case>{{{3, 17}, {17, 5}},
                                         {{2, 3, 4}, {4, 5}},
                                         {{1, 1, 3, 4}, {4, 5}},
                                         {{3, 5, 4}, {3, 4, 2}},
                                         {{2, 1, 3, 4}, {3, 4, 5}},
                                         {{5, 3}, {4, 3, 2}},
                                         {{1, 65}, {65, 1}}}) {
    Tensor a = random_tensor(c.a, 1), b = random_tensor(c.b, 2);
    Variable out = matmul(Variable(a), Variable(b));
    EXPECT_TENSOR_CLOSE(out.data(), reference_matmul(a, b), 1e-12, 1e-12)
        << shape_str(c.a) << " @ " << shape_str(c.b);
    // The same through strided and transposed views of the same values.
    Tensor a_t = a.transpose(-1, -2).contiguous().transpose(-1, -2);  // column-major inner dims
    EXPECT_TENSOR_CLOSE(matmul(Variable(a_t), Variable(non_contiguous(b))).data(), reference_matmul(a, b), 1e-12,
                        1e-12)
        << shape_str(c.a) << " @ " << shape_str(c.b) << " (strided)";
  }
}

TEST(Matmul, F32AndEmptyInnerDim) {
  Variable a(Tensor::from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3})), b(Tensor::from_vector<float>({1, 0, 0, 1, 1, 1}, {3, 2}));
  Variable c = matmul(a, b);
  EXPECT_EQ(c.dtype(), DType::f32);
  EXPECT_EQ(c.data().to_vector<float>(), (std::vector<float>{4, 5, 10, 11}));
  Variable e = matmul(Variable(Tensor::zeros({2, 3, 0}, DType::f64)), Variable(Tensor::zeros({0, 4}, DType::f64)));
  EXPECT_EQ(e.shape(), (Shape{2, 3, 4}));
  EXPECT_TENSOR_CLOSE(e.data(), Tensor::zeros({2, 3, 4}, DType::f64), 0, 0);
}

TEST(Matmul, KernelTransposeFlagsAlphaAndBeta) {
  // c = 2 * a^T @ b^T + 0.5 * c, on stored a (K, M) and b (N, K), batched with a shared b.
  Tensor a = random_tensor({3, 17, 5}, 31), b = random_tensor({4, 17}, 32), c0 = random_tensor({3, 5, 4}, 33);
  Tensor c = c0.clone();
  cpu::gemm(c, a, b, true, true, 2.0, 0.5, Stream::default_for(Device::cpu()));
  Tensor prod = reference_matmul(a.transpose(-1, -2).contiguous(), b.transpose(0, 1).contiguous());
  Tensor expected = testing::reference_binary(prod, c0, [](double p, double q) { return 2 * p + 0.5 * q; });
  EXPECT_TENSOR_CLOSE(c, expected, 1e-12, 1e-12);
  // An empty inner dim still applies beta.
  Tensor e = c0.clone();
  cpu::gemm(e, Tensor::zeros({3, 5, 0}, DType::f64), Tensor::zeros({0, 4}, DType::f64), false, false, 1.0, 0.5,
            Stream::default_for(Device::cpu()));
  EXPECT_TENSOR_CLOSE(e, testing::reference_binary(c0, c0, [](double p, double) { return 0.5 * p; }), 0, 0);
  Tensor wrong = Tensor::empty({3, 5, 3}, DType::f64);
  EXPECT_ERROR_MENTIONS(cpu::gemm(wrong, a, b, true, true, 1.0, 0.0, Stream::default_for(Device::cpu())), "gemm",
                        "(3, 5, 3)", "(4, 17)");
}

TEST(Matmul, GradientsPlain) {
  EXPECT_GRADCHECK(matmul_of, {random_tensor({3, 17}, 3), non_contiguous(random_tensor({17, 1}, 4))});
  EXPECT_GRADCHECK(matmul_of, {non_contiguous(random_tensor({1, 65}, 5)), random_tensor({65, 3}, 6)});
}

TEST(Matmul, GradientsBatchedWithTwoDimensionalB) {
  // b shared by every batch: one stacked GEMM forward, dL/db summed over the batch.
  EXPECT_GRADCHECK(matmul_of, {non_contiguous(random_tensor({3, 17, 5}, 7)), random_tensor({5, 3}, 8)});
  EXPECT_GRADCHECK(matmul_of, {random_tensor({3, 1, 17, 3}, 9), non_contiguous(random_tensor({1, 3, 3}, 10))});
}

TEST(Matmul, GradientsBroadcastBatchDims) {
  EXPECT_GRADCHECK(matmul_of, {random_tensor({3, 1, 5, 3}, 11), non_contiguous(random_tensor({17, 3, 2}, 12))});
  EXPECT_GRADCHECK(matmul_of, {non_contiguous(random_tensor({5, 3}, 13)), random_tensor({3, 3, 17}, 14)});
  EXPECT_GRADCHECK(matmul_of, {random_tensor({3, 17, 3}, 15), random_tensor({3, 3, 1}, 16)});
}

TEST(Matmul, GradientsThroughTransposedViews) {
  // The transposes are views; matmul passes them to BLAS as transpose flags.
  EXPECT_GRADCHECK(
      [](const std::vector<Variable>& in) {
        return std::vector<Variable>{matmul(transpose(in[0], 0, 1), transpose(in[1], -1, -2))};
      },
      {random_tensor({17, 3}, 17), random_tensor({3, 5, 17}, 18)});
}

TEST(Matmul, ErrorsNameShapes) {
  Variable a(Tensor::zeros({2, 3, 4}, DType::f64)), b(Tensor::zeros({5, 6}, DType::f64));
  EXPECT_ERROR_MENTIONS(matmul(a, b), "matmul", "(2, 3, 4)", "(5, 6)", "4", "5");
  Variable c(Tensor::zeros({3, 4, 6}, DType::f64));
  EXPECT_ERROR_MENTIONS(matmul(a, c), "matmul", "(2, 3, 4)", "(3, 4, 6)", "broadcast");
  EXPECT_ERROR_MENTIONS(matmul(Variable(Tensor::zeros({4}, DType::f64)), c), "matmul", "(4,)", "2-D");
  EXPECT_ERROR_MENTIONS(matmul(a, Variable(Tensor::zeros({4, 6}, DType::f32))), "matmul", "f64", "f32");
}

TEST(Linear, ValuesMatchMatmulPlusBias) {
  Tensor x = random_tensor({2, 3, 17}, 19), w = random_tensor({5, 17}, 20), bias = random_tensor({5}, 21);
  Tensor expected_no_bias = reference_matmul(x, w.transpose(0, 1).contiguous());
  Tensor expected = testing::reference_binary(expected_no_bias, bias, [](double p, double q) { return p + q; });
  EXPECT_TENSOR_CLOSE(linear(Variable(x), Variable(w), Variable(bias)).data(), expected, 1e-12, 1e-12);
  EXPECT_TENSOR_CLOSE(linear(Variable(non_contiguous(x)), Variable(w)).data(), expected_no_bias, 1e-12, 1e-12);
  // 1-D x: (In) -> (Out).
  Variable y = linear(Variable(x.select(0, 0).select(0, 0)), Variable(w), Variable(bias));
  EXPECT_EQ(y.shape(), (Shape{5}));
  EXPECT_TENSOR_CLOSE(y.data(), expected.select(0, 0).select(0, 0), 1e-12, 1e-12);
}

TEST(Linear, Gradients) {
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{linear(in[0], in[1], in[2])}; },
                   {non_contiguous(random_tensor({3, 5, 17}, 22)), random_tensor({3, 17}, 23), random_tensor({3}, 24)});
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{linear(in[0], in[1])}; },
                   {random_tensor({17, 3}, 25), non_contiguous(random_tensor({5, 3}, 26))});
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{linear(in[0], in[1], in[2])}; },
                   {random_tensor({17}, 27), random_tensor({1, 17}, 28), non_contiguous(random_tensor({1}, 29))});
  // A transposed weight view is read with a BLAS flag.
  EXPECT_GRADCHECK(
      [](const std::vector<Variable>& in) { return std::vector<Variable>{linear(in[0], transpose(in[1], 0, 1))}; },
      {random_tensor({3, 17}, 30), random_tensor({17, 5}, 31)});
}

TEST(Linear, ErrorsNameShapes) {
  Variable x(Tensor::zeros({2, 17}, DType::f64)), w(Tensor::zeros({5, 16}, DType::f64));
  EXPECT_ERROR_MENTIONS(linear(x, w), "linear", "(2, 17)", "(5, 16)");
  Variable w_ok(Tensor::zeros({5, 17}, DType::f64)), bias(Tensor::zeros({4}, DType::f64));
  EXPECT_ERROR_MENTIONS(linear(x, w_ok, bias), "linear", "(4,)", "(5, 17)");
  EXPECT_ERROR_MENTIONS(linear(x, Variable(Tensor::zeros({17}, DType::f64))), "linear", "(17,)");
  EXPECT_ERROR_MENTIONS(linear(x, Variable(Tensor::zeros({5, 17}, DType::f32))), "linear", "f64", "f32");
}

// On the CPU (f32/f64 arithmetic) linear_wide_out is linear of x widened to the
// weight's dtype: values, gradients (x's back in x's dtype), and a named error
// for a 16-bit weight. (The 16-bit CUDA product: CudaRouter.WideOutputLinear...)
TEST(LinearWideOut, OnTheCpuIsLinearOfTheWidenedInput) {
  Tensor x = random_tensor({2, 3, 17}, 40, DType::f32), w = random_tensor({5, 17}, 41);  // x f32, w f64
  Variable xv(x, true), wv(w, true);
  Variable y = linear_wide_out(xv, wv);
  EXPECT_EQ(y.dtype(), DType::f64);
  EXPECT_TENSOR_CLOSE(y.data(), reference_matmul(x.to(DType::f64), w.transpose(0, 1).contiguous()), 1e-12, 1e-12);
  y.backward(Tensor::ones({2, 3, 5}, DType::f64));
  EXPECT_EQ(xv.grad().dtype(), DType::f32);
  EXPECT_GRADCHECK([](const std::vector<Variable>& in) { return std::vector<Variable>{linear_wide_out(in[0], in[1])}; },
                   {non_contiguous(random_tensor({3, 5, 17}, 42)), random_tensor({4, 17}, 43)});
  EXPECT_ERROR_MENTIONS(linear_wide_out(Variable(x), Variable(w.to(DType::bf16))), "linear_wide_out", "bf16");
}

}  // namespace
}  // namespace loom
