// Lightning attention kernels: the blocked form equals the recurrent oracle
// (outputs, final state, dq, dk, dv, dS_initial) in f64 over awkward lengths,
// block sizes and decays (none and strong) with a random initial state; the
// recurrent form equals an independent loop over o_i = s_o sum_j gamma^(i-j)
// (q_i.k_j) v_j + s_o gamma^(i+1) q_i S0; f32 follows f64; kernel errors.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "framework/stream.h"
#include "kernels/cpu/lightning.h"
#include "tests/ops_nn/ops_nn_test_util.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::random_tensor;
using testing::values;

struct Inputs {
  Tensor q, k, v, s0, lambdas;
};

Inputs make_inputs(int64_t B, int64_t T, int64_t H, int64_t D, const std::vector<double>& lambdas, uint64_t seed,
                   DType dtype = DType::f64) {
  Inputs in;
  in.q = random_tensor({B, T, H, D}, seed, dtype, 0.5);
  in.k = random_tensor({B, T, H, D}, seed + 1, dtype, 0.5);
  in.v = random_tensor({B, T, H, D}, seed + 2, dtype);
  in.s0 = random_tensor({B, H, D, D}, seed + 3, dtype);
  in.lambdas = Tensor::from_vector(lambdas, {H});
  return in;
}

struct Results {
  Tensor out, final_state, dq, dk, dv, ds0;
};

Results run(const Inputs& in, const Tensor& dout, const Tensor& dsf, double scale, int64_t block) {
  Stream& s = Stream::default_for(Device::cpu());
  Shape state{in.s0.shape()};
  Results r{Tensor::empty(in.q.shape(), in.q.dtype()), Tensor::empty(state, in.q.dtype()),
            Tensor::empty(in.q.shape(), in.q.dtype()), Tensor::empty(in.q.shape(), in.q.dtype()),
            Tensor::empty(in.q.shape(), in.q.dtype()), Tensor::empty(state, in.q.dtype())};
  cpu::lightning_forward(r.out, r.final_state, in.q, in.k, in.v, in.s0, in.lambdas, scale, block, s);
  cpu::lightning_backward(r.dq, r.dk, r.dv, r.ds0, dout, dsf, in.q, in.k, in.v, in.s0, in.lambdas, scale, block, s);
  return r;
}

void expect_results_close(const Results& a, const Results& e, double tol, const std::string& what) {
  EXPECT_TENSOR_CLOSE(a.out, e.out, tol, tol) << what << " out";
  EXPECT_TENSOR_CLOSE(a.final_state, e.final_state, tol, tol) << what << " final_state";
  EXPECT_TENSOR_CLOSE(a.dq, e.dq, tol, tol) << what << " dq";
  EXPECT_TENSOR_CLOSE(a.dk, e.dk, tol, tol) << what << " dk";
  EXPECT_TENSOR_CLOSE(a.dv, e.dv, tol, tol) << what << " dv";
  EXPECT_TENSOR_CLOSE(a.ds0, e.ds0, tol, tol) << what << " dS_initial";
}

TEST(LightningKernel, BlockedEqualsRecurrentF64) {
  // Head 0 no decay, head 1 mild, head 2 strong (gamma = e^-2).
  std::vector<double> lambdas = {0.0, 0.05, 2.0};
  const int64_t B = 2, H = 3, D = 4;
  const double scale = 0.7;
  for (int64_t T : {1, 3, 17, 64, 65, 130}) {
    Inputs in = make_inputs(B, T, H, D, lambdas, 100 + T);
    Tensor dout = random_tensor({B, T, H, D}, 200 + T);
    Tensor dsf = random_tensor({B, H, D, D}, 300 + T);
    Results oracle = run(in, dout, dsf, scale, 0);
    for (int64_t block : {1, 16, 64}) {
      Results blocked = run(in, dout, dsf, scale, block);
      expect_results_close(blocked, oracle, 1e-12, "T " + std::to_string(T) + " Bk " + std::to_string(block));
    }
  }
}

TEST(LightningKernel, UndefinedGradientsAndStateCountAsZero) {
  const int64_t B = 1, T = 9, H = 2, D = 3;
  Inputs in = make_inputs(B, T, H, D, {0.0, 0.7}, 7);
  Tensor zeros_out = Tensor::zeros({B, T, H, D}, DType::f64), zeros_state = Tensor::zeros({B, H, D, D}, DType::f64);
  Tensor dout = random_tensor({B, T, H, D}, 8), dsf = random_tensor({B, H, D, D}, 9);
  for (int64_t block : {0, 4}) {
    expect_results_close(run(in, Tensor(), dsf, 1.0, block), run(in, zeros_out, dsf, 1.0, block), 0, "no dout");
    expect_results_close(run(in, dout, Tensor(), 1.0, block), run(in, dout, zeros_state, 1.0, block), 0, "no dS");
    Inputs no_state = in, zero_state = in;
    no_state.s0 = Tensor();
    zero_state.s0 = zeros_state;
    Stream& s = Stream::default_for(Device::cpu());
    Tensor o1 = Tensor::empty(in.q.shape(), DType::f64), f1 = Tensor::empty(zeros_state.shape(), DType::f64);
    cpu::lightning_forward(o1, f1, in.q, in.k, in.v, Tensor(), in.lambdas, 1.0, block, s);
    Results r = run(zero_state, dout, dsf, 1.0, block);
    EXPECT_TENSOR_CLOSE(o1, r.out, 0, 0);
    EXPECT_TENSOR_CLOSE(f1, r.final_state, 0, 0);
  }
}

// o_i = s_o sum_{j<=i} gamma^(i-j) (q_i.k_j) v_j + s_o gamma^(i+1) q_i S0, and
// S_final = gamma^T S0 + sum_j gamma^(T-1-j) k_j^T v_j, written as plain loops.
TEST(LightningKernel, RecurrentMatchesExplicitSums) {
  const int64_t B = 2, T = 13, H = 2, D = 3;
  const double scale = 0.4;
  std::vector<double> lambdas = {0.0, 0.9};
  Inputs in = make_inputs(B, T, H, D, lambdas, 31);
  std::vector<double> q = values(in.q), k = values(in.k), v = values(in.v), s0 = values(in.s0);
  std::vector<double> out(B * T * H * D, 0.0), fin(B * H * D * D, 0.0);
  auto at = [&](int64_t b, int64_t t, int64_t h, int64_t d) { return ((b * T + t) * H + h) * D + d; };
  auto st = [&](int64_t b, int64_t h, int64_t r, int64_t c) { return ((b * H + h) * D + r) * D + c; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      double gamma = std::exp(-lambdas[h]);
      for (int64_t i = 0; i < T; ++i)
        for (int64_t c = 0; c < D; ++c) {
          double total = 0.0;
          for (int64_t j = 0; j <= i; ++j) {
            double qk = 0.0;
            for (int64_t d = 0; d < D; ++d) qk += q[at(b, i, h, d)] * k[at(b, j, h, d)];
            total += std::pow(gamma, static_cast<double>(i - j)) * qk * v[at(b, j, h, c)];
          }
          for (int64_t r = 0; r < D; ++r)
            total += std::pow(gamma, static_cast<double>(i + 1)) * q[at(b, i, h, r)] * s0[st(b, h, r, c)];
          out[at(b, i, h, c)] = scale * total;
        }
      for (int64_t r = 0; r < D; ++r)
        for (int64_t c = 0; c < D; ++c) {
          double total = std::pow(gamma, static_cast<double>(T)) * s0[st(b, h, r, c)];
          for (int64_t j = 0; j < T; ++j)
            total += std::pow(gamma, static_cast<double>(T - 1 - j)) * k[at(b, j, h, r)] * v[at(b, j, h, c)];
          fin[st(b, h, r, c)] = total;
        }
    }
  Stream& s = Stream::default_for(Device::cpu());
  for (int64_t block : {0, 5}) {
    Tensor o = Tensor::empty(in.q.shape(), DType::f64), f = Tensor::empty(in.s0.shape(), DType::f64);
    cpu::lightning_forward(o, f, in.q, in.k, in.v, in.s0, in.lambdas, scale, block, s);
    EXPECT_TENSOR_CLOSE(o, Tensor::from_vector(out, in.q.shape()), 1e-12, 1e-12) << "block " << block;
    EXPECT_TENSOR_CLOSE(f, Tensor::from_vector(fin, in.s0.shape()), 1e-12, 1e-12) << "block " << block;
  }
}

TEST(LightningKernel, EmptySequenceKeepsTheState) {
  Inputs in = make_inputs(1, 0, 2, 3, {0.0, 1.0}, 5);
  Results r = run(in, Tensor(), random_tensor({1, 2, 3, 3}, 6), 1.0, 4);
  EXPECT_TENSOR_CLOSE(r.final_state, in.s0, 0, 0);
  EXPECT_EQ(r.out.numel(), 0);
}

TEST(LightningKernel, F32FollowsF64) {
  const int64_t B = 2, T = 70, H = 2, D = 8;
  Inputs in64 = make_inputs(B, T, H, D, {0.0, 0.5}, 41);
  Inputs in32{in64.q.to(DType::f32), in64.k.to(DType::f32), in64.v.to(DType::f32), in64.s0.to(DType::f32),
              in64.lambdas};
  Tensor dout = random_tensor({B, T, H, D}, 42), dsf = random_tensor({B, H, D, D}, 43);
  Results r64 = run(in64, dout, dsf, 0.5, 16);
  Results r32 = run(in32, dout.to(DType::f32), dsf.to(DType::f32), 0.5, 16);
  for (auto [a, e, name] : {std::tuple{&r32.out, &r64.out, "out"}, {&r32.final_state, &r64.final_state, "state"},
                            {&r32.dq, &r64.dq, "dq"}, {&r32.dk, &r64.dk, "dk"}, {&r32.dv, &r64.dv, "dv"},
                            {&r32.ds0, &r64.ds0, "ds0"}})
    EXPECT_TENSOR_CLOSE(a->to(DType::f64), *e, 1e-4, 1e-4) << name;
}

TEST(LightningKernel, ErrorsNameTheValues) {
  Inputs in = make_inputs(1, 4, 2, 3, {0.0, 1.0}, 1);
  Stream& s = Stream::default_for(Device::cpu());
  Tensor o = Tensor::empty(in.q.shape(), DType::f64), f = Tensor::empty(in.s0.shape(), DType::f64);
  EXPECT_ERROR_MENTIONS(cpu::lightning_forward(o, f, in.q, in.k, in.v, in.s0, in.lambdas, 1.0, -1, s),
                        {"block_size = -1"});
  EXPECT_ERROR_MENTIONS(
      cpu::lightning_forward(o, f, in.q, in.k, in.v, in.s0, Tensor::from_vector(std::vector<double>{0.0, -0.5}, {2}),
                             1.0, 4, s),
      {"decay_lambdas[1] = -0.5"});
  EXPECT_ERROR_MENTIONS(cpu::lightning_forward(o, f, in.q, in.k.transpose(1, 2), in.v, in.s0, in.lambdas, 1.0, 4, s),
                        {"k must be contiguous"});
  Tensor bad_state = Tensor::empty({1, 2, 3, 4}, DType::f64);
  EXPECT_ERROR_MENTIONS(cpu::lightning_forward(o, f, in.q, in.k, in.v, bad_state, in.lambdas, 1.0, 4, s),
                        {"initial_state shape (1, 2, 3, 4)", "(1, 2, 3, 3)"});
  Tensor f32_out = Tensor::empty(in.q.shape(), DType::f32);
  EXPECT_ERROR_MENTIONS(cpu::lightning_forward(f32_out, f, in.q, in.k, in.v, in.s0, in.lambdas, 1.0, 4, s),
                        {"out dtype f32"});
}

}  // namespace
}  // namespace loom
