// ZeRO-1 (optim/adamw.h with a shard group) under mpirun at 1, 2 and 3 ranks:
// the sharded optimizer gives every rank bitwise the parameters of the
// unsharded one (same fused kernel on the same values; the all-gather copies),
// its gathered state_dict equals the unsharded state_dict bitwise, unsharded
// state loads into it and training continues identically, each rank keeps
// only its slice of the state, and mixed parameter dtypes are refused by name.
// Parameter sizes make slices cut through parameters and leave some ranks no
// piece of a parameter (sizes 1 and 2 at 3 ranks); one parameter has no
// gradient in one step (skipped, its moments kept). The weights' all-gather
// also runs in small rounds that cut through parameters.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "optim/adamw.h"
#include "parallel/communicator.h"
#include "tests/parallel/parallel_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::cpu_stream;
using testing::error_message;

Communicator& world() { return testing::mpi_context().world(); }

const std::vector<Shape> kShapes = {{7}, {3, 5}, {1}, {4, 4}, {2}, {2, 3, 3}};

// Parameters with the same values on every rank (seeded), alternating weight decay.
std::vector<Parameter> make_params(DType dtype, uint64_t seed) {
  std::vector<Parameter> params;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    Parameter p;
    p.name = std::string(1, 'p');  // appended, not "p" + to_string (a GCC 12 -Wrestrict false positive)
    p.name += std::to_string(i);
    p.var = Variable(testing::random_tensor(kShapes[i], seed + i, DType::f32).to(dtype), true);
    p.attrs.weight_decay = i % 2 == 0;
    params.push_back(p);
  }
  return params;
}

// Gradients of step `step` (the same on every rank); parameter 2 has none in step 1.
void set_grads(const std::vector<Parameter>& params, int step, DType dtype) {
  for (size_t i = 0; i < params.size(); ++i) {
    Variable v = params[i].var;
    v.zero_grad();
    if (step == 1 && i == 2) continue;
    v.set_grad(testing::random_tensor(kShapes[i], 1000 + 100 * step + i, DType::f32).to(dtype));
  }
}

AdamWConfig adamw_config() {
  AdamWConfig c;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  return c;
}

void expect_same_state(const StateDict& got, const StateDict& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [key, t] : want) {
    ASSERT_TRUE(got.count(key)) << key;
    EXPECT_TENSOR_CLOSE(got.at(key), t, 0, 0) << key;
  }
}

// gather_chunk > 0: the weights' all-gather in rounds of that many elements per rank (several rounds, rounds
// cutting through parameters).
void check_sharded_equals_unsharded(DType dtype, int64_t gather_chunk) {
  SCOPED_TRACE(::testing::Message() << dtype << " at " << world().size() << " ranks, gather chunk " << gather_chunk);
  std::vector<Parameter> ref = make_params(dtype, 10), sharded = make_params(dtype, 10);
  AdamW plain(ref, adamw_config());
  AdamW zero(sharded, adamw_config(), &world());
  if (gather_chunk > 0) zero.set_gather_chunk(gather_chunk);
  EXPECT_EQ(zero.sharded(), world().size() > 1);
  for (int step = 0; step < 3; ++step) {
    set_grads(ref, step, dtype);
    set_grads(sharded, step, dtype);
    plain.step(1e-2 * (step + 1));
    zero.step(1e-2 * (step + 1), cpu_stream());
    for (size_t i = 0; i < ref.size(); ++i)
      EXPECT_TENSOR_CLOSE(sharded[i].var.data(), ref[i].var.data(), 0, 0) << ref[i].name << " step " << step;
  }
  expect_same_state(zero.state_dict(), plain.state_dict());

  // This rank's share of the state: one slice of ceil(N / P) per kind.
  int64_t total = 0;
  for (const Shape& s : kShapes) total += shape_numel(s);
  const int64_t kinds = dtype == DType::bf16 ? 3 : 2, slice = (total + world().size() - 1) / world().size();
  if (world().size() > 1) {
    EXPECT_EQ(zero.state_elements(), kinds * slice);
  } else {
    EXPECT_EQ(zero.state_elements(), kinds * total);
  }

  // Unsharded state into a fresh sharded optimizer (parameters as they are now): the next step agrees.
  std::vector<Parameter> resumed = make_params(dtype, 99);  // other values: the load must overwrite the masters
  for (size_t i = 0; i < resumed.size(); ++i) {
    Tensor data = resumed[i].var.data();
    data.copy_(ref[i].var.data());
  }
  AdamW loaded(resumed, adamw_config(), &world());
  if (gather_chunk > 0) loaded.set_gather_chunk(gather_chunk);
  loaded.load_state_dict(plain.state_dict());
  set_grads(ref, 3, dtype);
  set_grads(resumed, 3, dtype);
  plain.step(5e-3);
  loaded.step(5e-3, cpu_stream());
  for (size_t i = 0; i < ref.size(); ++i)
    EXPECT_TENSOR_CLOSE(resumed[i].var.data(), ref[i].var.data(), 0, 0) << ref[i].name << " after loading";
  expect_same_state(loaded.state_dict(), plain.state_dict());
}

TEST(ZeroOne, ShardedAdamWEqualsUnshardedBitwise) {
  check_sharded_equals_unsharded(DType::f32, 0);
  check_sharded_equals_unsharded(DType::f32, 5);
  check_sharded_equals_unsharded(DType::bf16, 0);  // fp32 masters, bf16 compute weights
  check_sharded_equals_unsharded(DType::bf16, 3);
}

TEST(ZeroOne, MixedParameterDtypesAreRefusedByName) {
  std::vector<Parameter> params = make_params(DType::f32, 10);
  params[3].var = Variable(params[3].var.data().to(DType::f64), true);
  const std::string message = error_message([&] { AdamW bad(params, adamw_config(), &world()); });
  if (world().size() > 1) {
    EXPECT_NE(message.find("'p3' is f64"), std::string::npos) << message;
  } else {
    EXPECT_EQ(message, "");  // one rank: nothing is sharded, mixed dtypes are fine
  }
}

}  // namespace
}  // namespace loom
