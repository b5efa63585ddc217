// GradReducer and broadcast_parameters: a two-layer MLP (tiny f64 ops written
// here over plain loops) trained data-parallel, each rank on its own shard,
// must produce on every rank the gradient of the mean loss over the global
// batch computed in one process, and stay bitwise identical across ranks after
// an SGD step. Also: bucket layout, buckets starting during backward, strictly
// ordered starts, parameters without gradients, gradient accumulation with
// no_sync, and misuse errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>

#include "framework/module.h"
#include "parallel/data_parallel.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::cpu_stream;
using testing::error_message;

Communicator& world() { return testing::mpi_context().world(); }
bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// ---- tiny f64 ops (contiguous inputs) ----

// x (N, In), w (Out, In), b (Out) -> (N, Out)
Variable linear_op(const Variable& x, const Variable& w, const Variable& b) {
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  Tensor xd = x.data().contiguous(), wd = w.data().contiguous(), bd = b.data().contiguous();
  Tensor y = Tensor::empty({n, out}, DType::f64);  // (N, Out)
  const double *xp = xd.data<double>(), *wp = wd.data<double>(), *bp = bd.data<double>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t o = 0; o < out; ++o) {
      double acc = bp[o];
      for (int64_t k = 0; k < in; ++k) acc += xp[i * in + k] * wp[o * in + k];
      y.data<double>()[i * out + o] = acc;
    }
  return make_output(y, {x, w, b}, "TestLinear", [xd, wd, n, in, out](const std::vector<Tensor>& g) {
    Tensor gy = g[0].contiguous();
    Tensor gx = Tensor::zeros({n, in}, DType::f64), gw = Tensor::zeros({out, in}, DType::f64),
           gb = Tensor::zeros({out}, DType::f64);
    const double *gp = gy.data<double>(), *xp = xd.data<double>(), *wp = wd.data<double>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < out; ++o) {
        const double go = gp[i * out + o];
        gb.data<double>()[o] += go;
        for (int64_t k = 0; k < in; ++k) {
          gx.data<double>()[i * in + k] += go * wp[o * in + k];
          gw.data<double>()[o * in + k] += go * xp[i * in + k];
        }
      }
    return std::vector<Tensor>{gx, gw, gb};
  });
}

Variable tanh_op(const Variable& x) {
  Tensor y = x.data().clone();
  for (int64_t i = 0; i < y.numel(); ++i) y.data<double>()[i] = std::tanh(y.data<double>()[i]);
  return make_output(y, {x}, "TestTanh", [y](const std::vector<Tensor>& g) {
    Tensor gx = g[0].contiguous().clone();
    for (int64_t i = 0; i < gx.numel(); ++i) gx.data<double>()[i] *= 1.0 - y.data<double>()[i] * y.data<double>()[i];
    return std::vector<Tensor>{gx};
  });
}

// mean((y - t)^2) over all elements -> ()
Variable mse_op(const Variable& y, const Tensor& target) {
  Tensor yd = y.data().contiguous(), td = target.contiguous();
  double total = 0;
  for (int64_t i = 0; i < yd.numel(); ++i) {
    const double d = yd.data<double>()[i] - td.data<double>()[i];
    total += d * d;
  }
  return make_output(Tensor::scalar(total / yd.numel(), DType::f64), {y}, "TestMse",
                     [yd, td](const std::vector<Tensor>& g) {
                       Tensor gy = Tensor::empty(yd.shape(), DType::f64);
                       const double scale = 2.0 * g[0].item() / yd.numel();
                       for (int64_t i = 0; i < yd.numel(); ++i)
                         gy.data<double>()[i] = scale * (yd.data<double>()[i] - td.data<double>()[i]);
                       return std::vector<Tensor>{gy};
                     });
}

// sum(p * c) -> ()
Variable dot_op(const Variable& p, const Tensor& c) {
  double total = 0;
  for (int64_t i = 0; i < p.numel(); ++i) total += p.data().data<double>()[i] * c.data<double>()[i];
  return make_output(Tensor::scalar(total, DType::f64), {p}, "TestDot", [c](const std::vector<Tensor>& g) {
    Tensor gp = c.clone();
    for (int64_t i = 0; i < gp.numel(); ++i) gp.data<double>()[i] *= g[0].item();
    return std::vector<Tensor>{gp};
  });
}

// ---- the model: x (N, 3) -> tanh(fc1) (N, 4) -> fc2 (N, 2) ----

struct Mlp {
  std::vector<Parameter> params;  // registration order: fc1.weight, fc1.bias, fc2.weight, fc2.bias
  explicit Mlp(uint64_t seed) {
    auto add = [&](const std::string& name, const Shape& shape, uint64_t s) {
      params.push_back({name, Variable(testing::random_tensor(shape, seed + s, DType::f64, 0.5), true), {}});
    };
    add("fc1.weight", {4, 3}, 1);
    add("fc1.bias", {4}, 2);
    add("fc2.weight", {2, 4}, 3);
    add("fc2.bias", {2}, 4);
  }
  const Variable& at(size_t i) const { return params[i].var; }
  Variable loss(const Tensor& x, const Tensor& target) const {
    Variable h = tanh_op(linear_op(Variable(x), at(0), at(1)));  // (N, 4)
    return mse_op(linear_op(h, at(2), at(3)), target);            // ()
  }
  // An independent copy of the current values (a separate graph).
  Mlp copy() const {
    Mlp m(0);
    for (size_t i = 0; i < params.size(); ++i) m.params[i].var = Variable(params[i].var.data().clone(), true);
    return m;
  }
  void sgd(double lr) {
    for (Parameter& p : params) {
      Tensor w = p.var.data();
      const Tensor& g = p.var.grad();
      for (int64_t i = 0; i < w.numel(); ++i) w.data<double>()[i] -= lr * g.data<double>()[i];
    }
  }
};

// The global batch: 2 rows per rank (same data on every rank; each rank uses its shard).
struct Batch {
  Tensor x, target;  // (2P, 3), (2P, 2)
  Batch(int p, uint64_t seed)
      : x(testing::random_tensor({2 * p, 3}, seed, DType::f64)),
        target(testing::random_tensor({2 * p, 2}, seed + 1, DType::f64)) {}
  Tensor x_shard(int r) const { return x.narrow(0, 2 * r, 2).contiguous(); }
  Tensor target_shard(int r) const { return target.narrow(0, 2 * r, 2).contiguous(); }
};

// True when every rank holds bitwise the same bytes as rank 0.
bool identical_across_ranks(const Tensor& t) {
  Tensor root = t.clone();
  world().broadcast(root, 0, cpu_stream());
  const bool same = std::memcmp(root.raw_data(), t.raw_data(), t.nbytes()) == 0;
  Tensor all_same = Tensor::from_vector<int32_t>({same ? 1 : 0}, {1});
  world().all_reduce(all_same, ReduceOp::min, cpu_stream());
  return all_same.item() == 1;
}

TEST(GradReducer, BucketsInReverseRegistrationOrder) {
  Mlp model(7);  // bytes (f64): fc1.weight 96, fc1.bias 32, fc2.weight 64, fc2.bias 16
  GradReducer one(model.params, world(), {int64_t{25} << 20});
  EXPECT_EQ(one.num_buckets(), 1);
  EXPECT_EQ(one.bucket_names()[0],
            (std::vector<std::string>{"fc2.bias", "fc2.weight", "fc1.bias", "fc1.weight"}));
  GradReducer hundred(model.params, world(), {100});
  EXPECT_EQ(hundred.bucket_names(), (std::vector<std::vector<std::string>>{
                                        {"fc2.bias", "fc2.weight"}, {"fc1.bias"}, {"fc1.weight"}}));
  GradReducer each(model.params, world(), {1});
  EXPECT_EQ(each.num_buckets(), 4);
  // Frozen parameters and repeated Variables are left out.
  std::vector<Parameter> params = model.params;
  params.push_back({"fc1.weight.tied", model.at(0), {}});
  params.push_back({"frozen", Variable(Tensor::zeros({3}, DType::f64), false), {}});
  GradReducer dedup(params, world(), {1});
  EXPECT_EQ(dedup.num_buckets(), 4);
  EXPECT_TRUE(contains(error_message([&] { GradReducer bad(model.params, world(), {0}); }), "bucket_bytes"));
}

TEST(GradReducer, GradientsEqualTheGlobalBatchGradientAndReplicasStayIdentical) {
  const int p = world().size(), r = world().rank();
  for (int64_t bucket_bytes : {int64_t{1}, int64_t{100}, int64_t{25} << 20}) {
    Mlp model(11);
    Mlp reference = model.copy();
    GradReducer reducer(model.params, world(), {bucket_bytes});
    for (int step = 0; step < 3; ++step) {
      Batch batch(p, 100 + step);
      for (Parameter& q : model.params) q.var.zero_grad();
      for (Parameter& q : reference.params) q.var.zero_grad();
      model.loss(batch.x_shard(r), batch.target_shard(r)).backward();
      reducer.finish();
      reference.loss(batch.x, batch.target).backward();  // one process, the whole batch
      for (size_t i = 0; i < model.params.size(); ++i) {
        EXPECT_TENSOR_CLOSE(model.at(i).grad(), reference.at(i).grad(), 1e-12, 1e-14)
            << model.params[i].name << " step " << step << " bucket_bytes " << bucket_bytes;
        EXPECT_TRUE(identical_across_ranks(model.at(i).grad())) << model.params[i].name;
      }
      model.sgd(0.1);
      reference.sgd(0.1);
      for (size_t i = 0; i < model.params.size(); ++i) {
        EXPECT_TRUE(identical_across_ranks(model.at(i).data())) << model.params[i].name << " step " << step;
        EXPECT_TENSOR_CLOSE(model.at(i).data(), reference.at(i).data(), 1e-12, 1e-14);
      }
    }
  }
}

TEST(GradReducer, BucketsStartDuringBackwardInOrder) {
  const int p = world().size(), r = world().rank();
  Mlp model(3);
  GradReducer reducer(model.params, world(), {1});  // one bucket per parameter
  // Registered after the reducer's hooks: sees the launches each readiness caused.
  std::vector<std::pair<std::string, int>> seen;
  for (const Parameter& q : model.params) {
    std::string name = q.name;
    Variable var = q.var;
    var.register_grad_ready_hook([&seen, &reducer, name](const Tensor&) {
      seen.emplace_back(name, reducer.launched_buckets());
    });
  }
  Batch batch(p, 5);
  model.loss(batch.x_shard(r), batch.target_shard(r)).backward();
  ASSERT_EQ(seen.size(), 4u);
  // After each readiness, the buckets started are exactly the longest prefix of
  // the bucket order whose parameters are all ready (a ready bucket waits for
  // earlier ones); at least one bucket is in flight before the last hook.
  const std::vector<std::string> order = {"fc2.bias", "fc2.weight", "fc1.bias", "fc1.weight"};
  EXPECT_EQ(reducer.bucket_names(), (std::vector<std::vector<std::string>>{{order[0]}, {order[1]}, {order[2]}, {order[3]}}));
  std::set<std::string> ready;
  for (const auto& [name, launched] : seen) {
    ready.insert(name);
    int prefix = 0;
    while (prefix < 4 && ready.count(order[prefix])) ++prefix;
    EXPECT_EQ(launched, prefix) << "after " << name;
  }
  EXPECT_GE(seen[seen.size() - 2].second, 1);
  EXPECT_EQ(seen.back().second, 4);
  EXPECT_EQ(reducer.launched_buckets(), 4);
  reducer.finish();
  EXPECT_EQ(reducer.launched_buckets(), 0);

  // A parameter without a gradient in the first bucket holds every later one
  // back (same start order on every rank); finish() starts them all.
  std::vector<Parameter> params = model.params;
  Variable idle(Tensor::ones({3}, DType::f64), true);
  params.push_back({"idle", idle, {}});  // registered last: first bucket
  for (Parameter& q : params) q.var.zero_grad();
  GradReducer held(params, world(), {1});
  EXPECT_EQ(held.bucket_names()[0], std::vector<std::string>{"idle"});
  model.loss(batch.x_shard(r), batch.target_shard(r)).backward();
  EXPECT_EQ(held.launched_buckets(), 0);
  held.finish();
  EXPECT_EQ(idle.grad().to_vector<double>(), std::vector<double>(3, 0.0));
}

TEST(GradReducer, ParametersWithoutGradientsOnSomeRanks) {
  const int p = world().size(), r = world().rank();
  Variable shared(Tensor::ones({3}, DType::f64), true);
  Variable only_rank0(Tensor::ones({2}, DType::f64), true);
  Variable unused(Tensor::ones({4}, DType::f64), true);
  std::vector<Parameter> params = {{"shared", shared, {}}, {"only_rank0", only_rank0, {}}, {"unused", unused, {}}};
  for (int64_t bucket_bytes : {int64_t{1}, int64_t{1} << 20}) {
    for (Parameter& q : params) q.var.zero_grad();
    GradReducer reducer(params, world(), {bucket_bytes});
    Tensor c = Tensor::from_vector<double>({1.0 + r, 2.0, 3.0}, {3});
    Variable loss = dot_op(shared, c);
    if (r == 0) {
      Variable extra = dot_op(only_rank0, Tensor::from_vector<double>({6.0, -3.0}, {2}));
      loss = make_output(Tensor::scalar(loss.item() + extra.item(), DType::f64), {loss, extra}, "TestAdd",
                         [](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0], g[0]}; });
    }
    loss.backward();
    reducer.finish();
    // shared: mean over ranks of (1 + r, 2, 3); only_rank0: (6, -3) / P; unused: zeros.
    double mean_first = 0;
    for (int q = 0; q < p; ++q) mean_first += (1.0 + q) / p;
    EXPECT_TENSOR_CLOSE(shared.grad(), Tensor::from_vector<double>({mean_first, 2.0, 3.0}, {3}), 1e-15, 0);
    EXPECT_TENSOR_CLOSE(only_rank0.grad(), Tensor::from_vector<double>({6.0 / p, -3.0 / p}, {2}), 1e-15, 0);
    ASSERT_TRUE(unused.grad().defined());
    EXPECT_EQ(unused.grad().to_vector<double>(), std::vector<double>(4, 0.0));
  }
}

TEST(GradReducer, AccumulationWithNoSync) {
  const int p = world().size(), r = world().rank();
  Mlp model(21);
  Mlp reference = model.copy();
  GradReducer reducer(model.params, world(), {100});
  Batch first(p, 40), second(p, 41), third(p, 42);
  {
    NoSyncGuard guard(reducer);
    EXPECT_FALSE(reducer.sync());
    model.loss(first.x_shard(r), first.target_shard(r)).backward();
    model.loss(second.x_shard(r), second.target_shard(r)).backward();
    EXPECT_EQ(reducer.launched_buckets(), 0);
    reducer.finish();  // no-op while not synchronizing: local sums stay
  }
  EXPECT_TRUE(reducer.sync());
  model.loss(third.x_shard(r), third.target_shard(r)).backward();
  EXPECT_GE(reducer.launched_buckets(), 1);
  reducer.finish();
  for (const Batch* b : {&first, &second, &third}) reference.loss(b->x, b->target).backward();
  for (size_t i = 0; i < model.params.size(); ++i) {
    EXPECT_TENSOR_CLOSE(model.at(i).grad(), reference.at(i).grad(), 1e-12, 1e-14) << model.params[i].name;
    EXPECT_TRUE(identical_across_ranks(model.at(i).grad()));
  }
}

TEST(GradReducer, SecondSynchronizedBackwardWithoutFinishIsAnError) {
  const int p = world().size(), r = world().rank();
  Mlp model(8);
  GradReducer reducer(model.params, world(), {1});
  Batch batch(p, 9);
  model.loss(batch.x_shard(r), batch.target_shard(r)).backward();
  std::string msg = error_message([&] { model.loss(batch.x_shard(r), batch.target_shard(r)).backward(); });
  EXPECT_TRUE(contains(msg, "became ready twice before finish()") && contains(msg, "NoSyncGuard")) << msg;
  reducer.finish();  // every rank still completes the same reductions
}

TEST(GradReducer, DestroyedReducerLeavesInertHooks) {
  const int p = world().size(), r = world().rank();
  Mlp model(4);
  { GradReducer reducer(model.params, world(), {1}); }
  Mlp reference = model.copy();
  Batch batch(p, 3);
  model.loss(batch.x_shard(r), batch.target_shard(r)).backward();  // no reduction, no crash
  reference.loss(batch.x_shard(r), batch.target_shard(r)).backward();
  EXPECT_TENSOR_CLOSE(model.at(0).grad(), reference.at(0).grad(), 0, 0);
}

TEST(BroadcastParameters, ReplicasStartFromRootValues) {
  const int p = world().size(), r = world().rank();
  for (int root = 0; root < p; ++root) {
    Mlp model(1000 + r);  // different on every rank
    Mlp on_root(1000 + root);
    // A non-contiguous parameter is broadcast through a contiguous copy.
    Tensor base = testing::random_tensor({3, 2}, 77 + r, DType::f64);
    Variable transposed(base.transpose(0, 1), true);
    std::vector<Parameter> params = model.params;
    params.push_back({"transposed", transposed, {}});
    broadcast_parameters(params, world(), root);
    for (size_t i = 0; i < model.params.size(); ++i)
      EXPECT_TENSOR_CLOSE(model.at(i).data(), on_root.at(i).data(), 0, 0) << model.params[i].name;
    EXPECT_TENSOR_CLOSE(transposed.data(), testing::random_tensor({3, 2}, 77 + root, DType::f64).transpose(0, 1), 0,
                        0);
  }
}

TEST(BroadcastParameters, MismatchedListsFailOnEveryRank) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Mlp model(1);
  std::vector<Parameter> params = model.params;
  if (world().rank() == 0) params.push_back({"extra", Variable(Tensor::zeros({1}, DType::f64), true), {}});
  std::string msg = error_message([&] { broadcast_parameters(params, world(), 0); });
  EXPECT_TRUE(contains(msg, "different parameter lists") && contains(msg, "counts from 4 to 5")) << msg;
}

}  // namespace
}  // namespace loom
