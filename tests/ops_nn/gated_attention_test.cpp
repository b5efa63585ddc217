// gated_attention: the output gate of gated attention and MoH applied by the attention kernels
// (out = o * sigmoid(z) * w, ALGORITHMS.md §8, §9) against attention's output times the gate
// written out; gradients of every input by finite differences for each gate form (headwise z,
// elementwise z, w with exact zeros as MoH's unrouted heads have, z and w together), with
// both outputs, each output alone, causal positions with GQA and S2; what the kernels keep
// for the backward; errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "framework/ops_nn.h"
#include "kernels/cpu/attention.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::random_tensor;
using testing::values;

// The gate forms: z per (token, head) row or per element, w per row.
struct GateForm {
  std::string name;
  bool z = false, z_per_row = true, w = false;
};
const std::vector<GateForm>& gate_forms() {
  static const std::vector<GateForm> forms = {{"headwise z", true, true, false},
                                              {"elementwise z", true, false, false},
                                              {"w", false, true, true},
                                              {"headwise z and w", true, true, true},
                                              {"elementwise z and w", true, false, true}};
  return forms;
}

// w (B, T, H) with every third entry exactly 0 (MoH's unrouted heads).
Tensor weights_with_zeros(const Shape& shape, uint64_t seed) {
  std::vector<double> w = values(random_tensor(shape, seed));
  for (size_t i = 0; i < w.size(); i += 3) w[i] = 0.0;
  return Tensor::from_vector(w, shape);
}

struct Operands {
  std::vector<Tensor> inputs;  // q, k, v, then z and w where the form has them
};

Operands operands(const GateForm& form, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, uint64_t seed) {
  Operands o;
  o.inputs = {random_tensor({B, T, H, D}, seed), random_tensor({B, T, Hkv, D}, seed + 1),
              random_tensor({B, T, Hkv, D}, seed + 2)};
  if (form.z) o.inputs.push_back(random_tensor(form.z_per_row ? Shape{B, T, H} : Shape{B, T, H, D}, seed + 3));
  if (form.w) o.inputs.push_back(weights_with_zeros({B, T, H}, seed + 4));
  return o;
}

AttentionOutputGate gate_of(const GateForm& form, const std::vector<Variable>& in) {
  AttentionOutputGate g;
  if (form.z) g.z = in[3];
  if (form.w) g.w = in[3 + form.z];
  return g;
}

AttentionOptions causal_options(int64_t T, int64_t offset) {
  AttentionOptions o;
  std::vector<int64_t> pos;
  for (int64_t i = 0; i < T; ++i) pos.push_back(i + offset);
  o.q_positions = o.k_positions = Tensor::from_vector(pos, {T});
  return o;
}

TEST(GatedAttention, ForwardIsAttentionTimesTheGate) {
  const int64_t B = 2, T = 9, H = 4, Hkv = 2, D = 5;
  for (const GateForm& form : gate_forms()) {
    SCOPED_TRACE(form.name);
    Operands ops = operands(form, B, T, H, Hkv, D, 11);
    std::vector<Variable> in(ops.inputs.begin(), ops.inputs.end());
    const AttentionOptions options = causal_options(T, 3);
    AttentionResult gated = gated_attention(in[0], in[1], in[2], gate_of(form, in), options);
    AttentionResult plain = attention(in[0], in[1], in[2], options);
    std::vector<double> o = values(plain.out.data()), expected(o.size());
    std::vector<double> z = form.z ? values(ops.inputs[3]) : std::vector<double>{};
    std::vector<double> w = form.w ? values(ops.inputs[3 + form.z]) : std::vector<double>{};
    for (size_t e = 0; e < o.size(); ++e) {
      const size_t row = e / D;
      double g = form.w ? w[row] : 1.0;
      if (form.z) g /= 1.0 + std::exp(-z[form.z_per_row ? row : e]);
      expected[e] = o[e] * g;
    }
    EXPECT_TENSOR_CLOSE(gated.out.data(), Tensor::from_vector(expected, plain.out.shape()), 1e-14, 1e-15);
    EXPECT_TENSOR_CLOSE(gated.lse.data(), plain.lse.data(), 0, 0);
  }
}

TEST(GatedAttention, GradCheckEveryGateForm) {
  // Both outputs (the lse gradient too), causal by positions with GQA 2.
  for (const GateForm& form : gate_forms()) {
    SCOPED_TRACE(form.name);
    auto fn = [&](const std::vector<Variable>& in) {
      AttentionResult r = gated_attention(in[0], in[1], in[2], gate_of(form, in), causal_options(7, 0));
      return std::vector<Variable>{r.out, r.lse};
    };
    EXPECT_GRADCHECK(fn, operands(form, 1, 7, 4, 2, 3, 21).inputs, testing::attention_tolerance());
  }
}

TEST(GatedAttention, GradCheckEachOutputAlone) {
  // Only out used (the lse gradient undefined), then only lse (the gate gets no gradient).
  for (const GateForm& form : {gate_forms()[1], gate_forms()[3]}) {
    SCOPED_TRACE(form.name);
    auto out_only = [&](const std::vector<Variable>& in) {
      return std::vector<Variable>{gated_attention(in[0], in[1], in[2], gate_of(form, in), AttentionOptions{}).out};
    };
    auto lse_only = [&](const std::vector<Variable>& in) {
      return std::vector<Variable>{gated_attention(in[0], in[1], in[2], gate_of(form, in), AttentionOptions{}).lse};
    };
    const std::vector<Tensor> inputs = operands(form, 1, 5, 2, 1, 3, 31).inputs;
    EXPECT_GRADCHECK(out_only, inputs, testing::attention_tolerance());
    EXPECT_GRADCHECK(lse_only, inputs, testing::attention_tolerance());
  }
}

TEST(GatedAttention, GradCheckS2) {
  // S2 (block 2, 1 local block, vert_stride 2) with the headwise gate and w, B 2.
  const GateForm& form = gate_forms()[3];
  AttentionOptions options = causal_options(9, 0);
  options.s2 = S2Pattern{2, 1, 2};
  auto fn = [&](const std::vector<Variable>& in) {
    AttentionResult r = gated_attention(in[0], in[1], in[2], gate_of(form, in), options);
    return std::vector<Variable>{r.out, r.lse};
  };
  EXPECT_GRADCHECK(fn, operands(form, 2, 9, 2, 2, 3, 41).inputs, testing::attention_tolerance());
}

TEST(GatedAttention, KeepsTheUngatedOutputOnlyForW) {
  // The sigmoid gate's backward works from out alone (o not kept); w can be 0, so with w o is kept.
  const int64_t B = 1, T = 6, H = 2, D = 4;
  for (const GateForm& form : gate_forms()) {
    SCOPED_TRACE(form.name);
    Operands ops = operands(form, B, T, H, H, D, 51);
    cpu::OutputGate g;
    if (form.z) g.z = ops.inputs[3];
    if (form.w) g.w = ops.inputs[3 + form.z];
    Tensor out = Tensor::empty({B, T, H, D}, DType::f64), lse = Tensor::empty({B, H, T}, DType::f64), ungated;
    Tensor pos = Tensor::arange(T);
    Stream& s = Stream::default_for(Device::cpu());
    cpu::attention_forward_gated(out, ungated, lse, ops.inputs[0], ops.inputs[1], ops.inputs[2], g, pos, pos,
                                 0.5, true, S2Pattern{}, s);
    EXPECT_EQ(ungated.defined(), form.w);
    if (!form.w) continue;
    Tensor o = Tensor::empty({B, T, H, D}, DType::f64);
    cpu::attention_forward(o, lse, ops.inputs[0], ops.inputs[1], ops.inputs[2], pos, pos, 0.5, true, S2Pattern{}, s);
    EXPECT_TENSOR_CLOSE(ungated, o, 0, 0);
  }
}

TEST(GatedAttention, ErrorsNameTheValues) {
  Variable q(random_tensor({1, 3, 4, 2}, 1)), k(random_tensor({1, 3, 2, 2}, 2)), v(random_tensor({1, 3, 2, 2}, 3));
  EXPECT_ERROR_MENTIONS(gated_attention(q, k, v, AttentionOutputGate{}, AttentionOptions{}),
                        {"gated_attention", "neither z nor w"});
  AttentionOutputGate bad_z;
  bad_z.z = Variable(random_tensor({1, 3, 2}, 4));
  EXPECT_ERROR_MENTIONS(gated_attention(q, k, v, bad_z, AttentionOptions{}),
                        {"gated_attention", "gate z", "(1, 3, 2)", "(1, 3, 4)", "(1, 3, 4, 2)"});
  AttentionOutputGate bad_w;
  bad_w.w = Variable(random_tensor({1, 3, 4, 2}, 5));
  EXPECT_ERROR_MENTIONS(gated_attention(q, k, v, bad_w, AttentionOptions{}),
                        {"gated_attention", "gate w", "(1, 3, 4, 2)", "(1, 3, 4)"});
  AttentionOutputGate f32_z;
  f32_z.z = Variable(random_tensor({1, 3, 4}, 6, DType::f32));
  EXPECT_ERROR_MENTIONS(gated_attention(q, k, v, f32_z, AttentionOptions{}), {"gated_attention", "f32", "f64"});
}

}  // namespace
}  // namespace loom
