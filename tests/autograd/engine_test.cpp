// Autograd engine: shared subgraphs, accumulation, hook order and timing,
// no_grad/detach, retained graphs, saved-tensor release, checkpointing.
// The ops here are tiny local ops over cpu kernels so that the engine is
// tested on its own.
#include <gtest/gtest.h>

#include "framework/autograd.h"
#include "kernels/cpu/elementwise.h"
#include "tests/testing.h"

namespace loom {
namespace {

Stream& cpu_stream() { return Stream::default_for(Device::cpu()); }

Tensor binary(const Tensor& a, const Tensor& b, cpu::BinaryOp op) {
  Tensor out = Tensor::empty(broadcast_shapes(a.shape(), b.shape()), a.dtype());
  cpu::binary(out, a, b, op, cpu_stream());
  return out;
}

// Same-shape product and sum, recorded with closures capturing their inputs.
Variable tmul(const Variable& a, const Variable& b) {
  Tensor ad = a.data(), bd = b.data();
  return make_output(binary(ad, bd, cpu::BinaryOp::mul), {a, b}, "TestMul",
                     [ad, bd](const std::vector<Tensor>& g) -> std::vector<Tensor> {
                       return {binary(g[0], bd, cpu::BinaryOp::mul), binary(g[0], ad, cpu::BinaryOp::mul)};
                     });
}
Variable tadd(const Variable& a, const Variable& b) {
  return make_output(binary(a.data(), b.data(), cpu::BinaryOp::add), {a, b}, "TestAdd",
                     [](const std::vector<Tensor>& g) -> std::vector<Tensor> { return {g[0], g[0]}; });
}
// Sum of all elements -> shape ().
Variable tsum(const Variable& x) {
  Tensor out = Tensor::zeros({}, x.dtype());
  Tensor xd = x.data().contiguous();
  double total = 0;
  for (double v : xd.to_vector<double>()) total += v;
  out.fill_(total);
  Shape shape = x.shape();
  DType dtype = x.dtype();
  return make_output(out, {x}, "TestSum", [shape, dtype](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    return {Tensor::full(shape, g[0].item(), dtype)};
  });
}

Variable leaf(std::vector<double> values, bool requires_grad = true) {
  int64_t n = static_cast<int64_t>(values.size());
  return Variable(Tensor::from_vector<double>(values, {n}), requires_grad);
}

TEST(Autograd, SharedSubgraphGetsTheSumOfItsUses) {
  Variable a = leaf({1.0, 2.0, -3.0}), b = leaf({0.5, 4.0, 2.0});
  Variable y = tmul(a, b);              // y = a b, used twice below
  Variable z = tadd(tmul(y, y), y);     // z = y^2 + y
  tsum(z).backward();
  // dz/da = (2y + 1) b, dz/db = (2y + 1) a
  std::vector<double> ga = a.grad().to_vector<double>(), gb = b.grad().to_vector<double>();
  std::vector<double> av = {1, 2, -3}, bv = {0.5, 4, 2};
  for (int i = 0; i < 3; ++i) {
    double yv = av[i] * bv[i];
    EXPECT_DOUBLE_EQ(ga[i], (2 * yv + 1) * bv[i]);
    EXPECT_DOUBLE_EQ(gb[i], (2 * yv + 1) * av[i]);
  }
  EXPECT_TRUE(y.grad_fn() != nullptr);
  EXPECT_FALSE(y.is_leaf());
}

TEST(Autograd, GradientsAccumulateAcrossBackwardsUntilZeroed) {
  Variable a = leaf({1.0, 2.0}), b = leaf({3.0, 5.0});
  tsum(tmul(a, b)).backward();
  tsum(tmul(a, b)).backward();
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{6.0, 10.0}));
  a.zero_grad();
  EXPECT_FALSE(a.grad().defined());
  tsum(tmul(a, b)).backward();
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{3.0, 5.0}));
}

TEST(Autograd, LeafGradIsAPrivateBuffer) {
  // The identity-like gradient of add must not alias the root gradient.
  Variable a = leaf({1.0, 2.0}), b = leaf({0.0, 0.0});
  Tensor root_grad = Tensor::from_vector<double>({1.0, 1.0}, {2});
  tadd(a, b).backward(root_grad);
  tadd(a, b).backward(root_grad);
  EXPECT_EQ(root_grad.to_vector<double>(), (std::vector<double>{1.0, 1.0}));
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{2.0, 2.0}));
}

TEST(Autograd, HooksFireOnceWithTheCompleteGradientLatestUseFirst) {
  Variable p1 = leaf({2.0}), p2 = leaf({3.0}), x = leaf({5.0}, false);
  std::vector<std::string> order;
  std::vector<double> seen;
  p1.register_grad_ready_hook([&](const Tensor& g) {
    order.push_back("p1");
    seen.push_back(g.item());
  });
  p2.register_grad_ready_hook([&](const Tensor& g) {
    order.push_back("p2");
    seen.push_back(g.item());
  });
  // h = p1 x; out = (p2 h) + p1: p1 is used twice (first and last), p2 once in between.
  Variable h = tmul(p1, x);
  Variable out = tadd(tmul(p2, h), p1);
  tsum(out).backward();
  ASSERT_EQ(order.size(), 2u);
  // p2's gradient completes before p1's (p1's first use is earliest in the forward).
  EXPECT_EQ(order[0], "p2");
  EXPECT_EQ(order[1], "p1");
  EXPECT_DOUBLE_EQ(seen[0], 10.0);           // d/dp2 = p1 x
  EXPECT_DOUBLE_EQ(seen[1], 3.0 * 5.0 + 1);  // d/dp1 = p2 x + 1: complete when the hook fires
}

TEST(Autograd, NoGradRecordsNothingAndDetachCutsTheGraph) {
  Variable a = leaf({1.0, 2.0});
  {
    NoGradGuard guard;
    EXPECT_FALSE(grad_mode_enabled());
    Variable y = tmul(a, a);
    EXPECT_FALSE(y.requires_grad());
    EXPECT_TRUE(y.grad_fn() == nullptr);
  }
  EXPECT_TRUE(grad_mode_enabled());
  Variable y = tmul(a, a);
  Variable d = y.detach();
  EXPECT_FALSE(d.requires_grad());
  EXPECT_TRUE(d.data().shares_storage(y.data()));
  tsum(tmul(d, a)).backward();  // only the direct use of a counts
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{1.0, 4.0}));
}

TEST(Autograd, SecondBackwardNeedsRetainGraph) {
  Variable a = leaf({1.0, 2.0});
  Variable loss = tsum(tmul(a, a));
  loss.backward({}, /*retain_graph=*/true);
  loss.backward();
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{4.0, 8.0}));
  try {
    loss.backward();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("retain_graph"), std::string::npos) << e.what();
  }
}

TEST(Autograd, BadRootsAreErrors) {
  Variable a = leaf({1.0, 2.0});
  Variable y = tmul(a, a);
  try {
    y.backward();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(2,)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(y.backward(Tensor::ones({3}, DType::f64)), Error);
  EXPECT_THROW(leaf({1.0}, false).backward(), Error);
  EXPECT_THROW(y.set_requires_grad(false), Error);
  EXPECT_THROW(Variable(Tensor::zeros({2}, DType::i64), true), Error);
}

TEST(Autograd, WrongGradientShapeFromANodeIsCaught) {
  Variable a = leaf({1.0, 2.0});
  Variable bad = make_output(a.data().clone(), {a}, "BadOp", [](const std::vector<Tensor>&) -> std::vector<Tensor> {
    return {Tensor::ones({3}, DType::f64)};
  });
  try {
    tsum(bad).backward();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("BadOp"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(3,)"), std::string::npos) << msg;
  }
}

// A chain of n products whose nodes each save a large tensor.
Variable chain(const Variable& x, const Variable& w, int n) {
  Variable h = x;
  for (int i = 0; i < n; ++i) h = tmul(h, w);
  return h;
}

TEST(Autograd, SavedTensorsAreReleasedAsNodesRun) {
  const int64_t n = 1 << 16;  // 512 KiB per f64 tensor
  Variable x(testing::random_tensor({n}, 1), true), w(testing::random_tensor({n}, 2), true);
  int64_t base = memory_stats(Device::cpu()).current_bytes;
  Variable loss = tsum(chain(x, w, 8));
  int64_t after_forward = memory_stats(Device::cpu()).current_bytes;
  EXPECT_GE(after_forward - base, 7 * n * 8);  // h1..h7, saved by the nodes that use them
  loss.backward();
  // `loss` (and with it every node) is still alive; only the two leaf grads remain.
  int64_t after_backward = memory_stats(Device::cpu()).current_bytes;
  EXPECT_LE(after_backward - base, 2 * n * 8 + 4096) << "saved tensors were not released";
}

TEST(Autograd, CheckpointGivesIdenticalGradientsAndKeepsNoActivations) {
  const int64_t n = 1 << 15;
  Tensor xv = testing::random_tensor({n}, 3, DType::f64, 0.9), wv = testing::random_tensor({n}, 4, DType::f64, 0.9);
  Variable x1(xv.clone(), true), w1(wv.clone(), true);
  Variable plain = tsum(chain(x1, w1, 6));
  plain.backward();

  Variable x2(xv.clone(), true), w2(wv.clone(), true);
  int64_t base = memory_stats(Device::cpu()).current_bytes;
  std::vector<Variable> out = checkpoint(
      [&](const std::vector<Variable>& in) { return std::vector<Variable>{chain(in[0], w2, 6)}; }, {x2});
  int64_t after_forward = memory_stats(Device::cpu()).current_bytes;
  // Only the region's output (and the saved input reference) is held, not 6 activations.
  EXPECT_LE(after_forward - base, 2 * n * 8 + 4096);
  Variable loss = tsum(out[0]);
  EXPECT_EQ(loss.item(), plain.item());
  loss.backward();
  EXPECT_TENSOR_CLOSE(x2.grad(), x1.grad(), 0, 0);
  EXPECT_TENSOR_CLOSE(w2.grad(), w1.grad(), 0, 0);  // captured parameter gets its gradient too
}

TEST(Autograd, CheckpointWithMultipleOutputsAndUnusedOutput) {
  Variable a = leaf({1.0, -2.0, 3.0}), b = leaf({2.0, 0.5, -1.0});
  auto fn = [](const std::vector<Variable>& in) {
    Variable p = tmul(in[0], in[1]);
    return std::vector<Variable>{p, tadd(p, in[0])};
  };
  std::vector<Variable> outs = checkpoint(fn, {a, b});
  tsum(outs[1]).backward();  // only the second output is used
  // d/da (ab + a) = b + 1; d/db = a
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{3.0, 1.5, 0.0}));
  EXPECT_EQ(b.grad().to_vector<double>(), (std::vector<double>{1.0, -2.0, 3.0}));
}

}  // namespace
}  // namespace loom
