// A full training step of the decoder under sequence parallelism equals one
// rank on the whole sequence: the loss (sum of the cp ranks' shares) and every
// parameter gradient (summed over cp), for cp in {2, 3, 4} x {contiguous,
// zigzag}, for lightning, softmax (ring / all-gather) and hybrid models with
// dense and MoE FFNs (MoE and MLP need no sequence communication: token-local;
// the MoE balance losses are made global over the sequence), with activation
// checkpointing, and with targets partly ignored so that the shares must use
// the global token count. Then dp x cp = 2 x 2 with the trainer's gradient
// reduction equals one rank.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/ops.h"
#include "models/decoder.h"
#include "parallel/data_parallel.h"
#include "parallel/mesh.h"
#include "tests/sp/sp_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

struct ModelCase {
  std::string name;
  std::string layers;
  std::string ffn = "dense";
  std::string softmax = "ring";
  bool checkpointing = false;
  bool moh = false;
  bool gated_s2 = false;  // S layers with an elementwise gate and S2 block sparsity
  int64_t short_conv = 0;  // L layers' q, k, v short convolution width (taps set nonzero by `build`)
};

DecoderConfig case_config(const ModelCase& c) {
  DecoderConfig d;
  d.vocab_size = 29;
  d.d_model = 12;
  d.n_layers = static_cast<int64_t>(c.layers.size());
  d.n_heads = 2;
  d.n_kv_heads = 1;
  d.head_dim = 6;
  d.ffn_hidden = 20;
  d.layers = c.layers;
  d.max_seq_len = 64;
  d.dtype = DType::f64;
  d.ffn = c.ffn;
  d.activation_checkpointing = c.checkpointing;
  d.lightning.block = 4;
  d.moe.experts = 4;
  d.moe.topk = 2;
  d.moe.hidden = 16;
  d.moe.aux_coef = 0.1;  // large enough that a wrong normalization shows
  d.moe.z_coef = 0.01;
  if (c.moh) {
    d.softmax.heads = "moh";
    d.softmax.moh.shared = 0;
    d.softmax.moh.topk = 1;
    d.softmax.moh.aux_coef = 0.1;
  }
  d.lightning.short_conv = c.short_conv;
  if (c.gated_s2) {
    d.softmax.gate = "elementwise";
    d.softmax.sparsity = "s2";
    d.softmax.s2.block = 4;  // 6 blocks of 24 tokens: some skipped beyond the local window
    d.softmax.s2.local_blocks = 1;
    d.softmax.s2.vert_stride = 2;  // each of the 2 kv heads its own strided shard
    d.n_kv_heads = 2;
  }
  return d;
}

// (B, T) ids and next-token targets with about a quarter ignored (-100), unevenly over the sequence.
std::pair<Tensor, Tensor> case_batch(int64_t batch, int64_t seq, int64_t vocab, uint64_t seed) {
  Tensor ids = testing::random_indices({batch, seq}, vocab, seed);
  Tensor targets = testing::random_indices({batch, seq}, vocab, seed + 1);
  int64_t* t = targets.data<int64_t>();
  for (int64_t i = 0; i < batch * seq; ++i)
    if ((i % seq) < seq / 3 && i % 2 == 0) t[i] = -100;
  return {ids, targets};
}

struct StepResult {
  double loss = 0;
  std::map<std::string, Tensor> grads;
};

StepResult collect(const DecoderLM& model, double loss) {
  StepResult r;
  r.loss = loss;
  for (const Parameter& p : model.named_parameters())
    r.grads[p.name] = p.var.grad().defined() ? p.var.grad().clone() : Tensor::zeros(p.var.shape(), p.var.dtype());
  return r;
}

// The model every rank builds: initialized from one seed, with the short
// convolutions' taps (which start at 0) set nonzero so that the halo exchange
// under cp changes the outputs and the input gradients, not only the taps'.
void build(DecoderLM& model, const DecoderConfig& config) {
  model.initialize(7, config.init_std, config.n_layers);
  uint64_t seed = 100;
  for (const Parameter& p : model.named_parameters()) {
    Tensor taps = p.var.data();  // shares the parameter's storage
    if (p.name.find("_conv.") != std::string::npos)
      taps.copy_(testing::random_tensor(taps.shape(), ++seed, DType::f64, 0.5));
  }
}

StepResult one_rank_step(const DecoderConfig& config, const Tensor& ids, const Tensor& targets) {
  DecoderLM model(config);
  build(model, config);
  SequenceContext ctx;
  Variable loss = model.loss(ids, targets, ctx);
  loss.backward();
  return collect(model, loss.item());
}

// This rank's share of the step, loss and gradients summed over `cp` (as the trainer's reduction does).
StepResult cp_step(const DecoderConfig& config, const Tensor& ids, const Tensor& targets, Communicator& cp,
                   LayoutKind kind, const std::string& softmax) {
  DecoderLM model(config);
  build(model, config);
  SequenceContext ctx;
  ctx.cp.layout = std::make_shared<TokenLayout>(kind, ids.size(1), cp.size());
  ctx.cp.comm = &cp;
  ctx.cp.softmax = softmax;
  Tensor local_ids = ctx.cp.layout->shard(ids, cp.rank(), 1), local_targets = ctx.cp.layout->shard(targets, cp.rank(), 1);
  Variable loss = model.loss(local_ids, local_targets, ctx);
  loss.backward();
  StepResult r = collect(model, loss.item());
  Tensor total = Tensor::scalar(r.loss, DType::f64);
  cp.all_reduce(total, ReduceOp::sum, testing::cpu_stream());
  r.loss = total.item();
  for (auto& [name, g] : r.grads) cp.all_reduce(g, ReduceOp::sum, testing::cpu_stream());
  return r;
}

void expect_same_step(const StepResult& actual, const StepResult& expected, const std::string& what) {
  EXPECT_NEAR(actual.loss, expected.loss, 1e-10 * std::fabs(expected.loss)) << what;
  ASSERT_EQ(actual.grads.size(), expected.grads.size()) << what;
  for (const auto& [name, g] : expected.grads) {
    EXPECT_TENSOR_CLOSE(actual.grads.at(name), g, 1e-8, 1e-11) << what << ": " << name;
  }
}

class CpModel : public ::testing::TestWithParam<std::tuple<int, LayoutKind>> {};

void run_cases(int cp_size, LayoutKind kind, const std::vector<ModelCase>& cases) {
  LOOM_SP_GROUP(cp, cp_size);
  const int64_t seq = 24, batch = 2;  // 24 = 2 * 3 * 4: every cp and layout divides
  for (const ModelCase& c : cases) {
    DecoderConfig config = case_config(c);
    auto [ids, targets] = case_batch(batch, seq, config.vocab_size, 3);
    StepResult expected = one_rank_step(config, ids, targets);
    StepResult actual = cp_step(config, ids, targets, *cp, kind, c.softmax);
    expect_same_step(actual, expected, c.name + " at cp " + std::to_string(cp_size) + " " + layout_kind_name(kind));
  }
}

TEST_P(CpModel, LightningAndMoeStepEqualsOneRank) {
  const auto [cp_size, kind] = GetParam();
  run_cases(cp_size, kind,
            {{"L dense", "LL"}, {"L moe", "LL", "moe"}, {"L moe checkpointed", "LL", "moe", "ring", true},
             // width 4: a halo of 3 tokens, the whole of a zigzag chunk at cp 4 (24 / 8)
             {"L short conv", "LL", "dense", "ring", false, false, false, 4},
             {"LS short conv checkpointed", "LS", "dense", "ring", true, false, false, 4}});
}

TEST_P(CpModel, HybridStepEqualsOneRank) {
  const auto [cp_size, kind] = GetParam();
  run_cases(cp_size, kind,
            {{"LLLS ring", "LLLS", "dense", "ring"},
             {"LLLS all-gather moe", "LLLS", "moe", "allgather"},
             {"LS ring moh checkpointed", "LS", "dense", "ring", true, true},
             {"SL all-gather gated s2", "SL", "dense", "allgather", false, false, true},
             {"SL ring gated s2", "SL", "dense", "ring", false, false, true}});
}

INSTANTIATE_TEST_SUITE_P(Layouts, CpModel,
                         ::testing::Combine(::testing::Values(2, 3, 4),
                                            ::testing::Values(LayoutKind::contiguous, LayoutKind::zigzag)),
                         [](const auto& info) {
                           return std::string(layout_kind_name(std::get<1>(info.param))) + "_cp" +
                                  std::to_string(std::get<0>(info.param));
                         });

TEST(CpModel, DataTimesContextParallelEqualsOneRank) {
  // dp 2 x cp 2 over the first 4 ranks (cp ranks contiguous), each dp rank its own 2 sequences;
  // gradients summed over dp_cp of share / dp (the trainer's reduction) equal one rank
  // averaging the two dp groups' losses.
  LOOM_SP_GROUP(four, 4);
  MeshSizes sizes;
  sizes.dp = 2;
  sizes.cp = 2;
  DeviceMesh mesh(sizes, *four);
  const ModelCase c{"LLLS moe", "LLLS", "moe", "ring"};
  DecoderConfig config = case_config(c);
  auto [ids, targets] = case_batch(4, 24, config.vocab_size, 11);  // (4, 24): dp rank d holds rows 2d, 2d+1

  DecoderLM reference(config);
  reference.initialize(7, config.init_std, config.n_layers);
  Variable ref_loss;
  for (int d = 0; d < 2; ++d) {
    SequenceContext ctx;
    Variable l = scale(reference.loss(ids.narrow(0, 2 * d, 2).contiguous(), targets.narrow(0, 2 * d, 2).contiguous(), ctx), 0.5);
    ref_loss = ref_loss.defined() ? add(ref_loss, l) : l;
  }
  ref_loss.backward();
  StepResult expected = collect(reference, ref_loss.item());

  DecoderLM model(config);
  model.initialize(7, config.init_std, config.n_layers);
  std::vector<Parameter> params = model.named_parameters();
  GradReducerOptions options;
  options.reduce_op = ReduceOp::sum;
  GradReducer reducer(params, mesh.group("dp_cp"), options);
  Communicator& cp = mesh.group("cp");
  SequenceContext ctx;
  ctx.cp.layout = std::make_shared<TokenLayout>(LayoutKind::zigzag, 24, 2);
  ctx.cp.comm = &cp;
  const int d = mesh.coord().dp;
  Tensor my_ids = ctx.cp.layout->shard(ids.narrow(0, 2 * d, 2).contiguous(), cp.rank(), 1);
  Tensor my_targets = ctx.cp.layout->shard(targets.narrow(0, 2 * d, 2).contiguous(), cp.rank(), 1);
  Variable share = scale(model.loss(my_ids, my_targets, ctx), 0.5);  // 1 / dp
  share.backward();
  reducer.finish();
  Tensor total = Tensor::scalar(share.item(), DType::f64);
  mesh.group("dp_cp").all_reduce(total, ReduceOp::sum, testing::cpu_stream());
  StepResult actual = collect(model, total.item());
  expect_same_step(actual, expected, "dp 2 x cp 2");
}

TEST(CpModel, FeedForwardLayersAreTokenLocal) {
  // MLP and (dropless) MoE outputs on a shard of the tokens are exactly the
  // corresponding rows of the outputs on the whole sequence: no sequence
  // communication is needed for them under cp.
  for (const std::string ffn : {"dense", "moe"}) {
    DecoderConfig config = case_config({"ffn", "L", ffn});
    std::shared_ptr<FeedForward> layer = create_ffn(config, 0);
    layer->initialize(5, config.init_std, 1);
    Tensor x = testing::random_tensor({2, 24, config.d_model}, 9);
    SequenceContext whole;
    Tensor full = layer->forward(Variable(x), whole).data();  // (B, T, C)
    for (LayoutKind kind : {LayoutKind::contiguous, LayoutKind::zigzag}) {
      TokenLayout layout(kind, 24, 3);
      for (int r = 0; r < 3; ++r) {
        SequenceContext part;
        Tensor local = layer->forward(Variable(layout.shard(x, r, 1)), part).data();
        EXPECT_TENSOR_CLOSE(local, layout.shard(full, r, 1), 1e-12, 1e-13) << ffn << " rank " << r;
      }
    }
  }
}

TEST(CpModel, WrongLocalLengthIsAnError) {
  LOOM_SP_GROUP(cp, 2);
  DecoderConfig config = case_config({"L", "L"});
  DecoderLM model(config);
  SequenceContext ctx;
  ctx.cp.layout = std::make_shared<TokenLayout>(LayoutKind::zigzag, 24, 2);
  ctx.cp.comm = cp.get();
  Tensor ids = testing::random_indices({1, 24}, config.vocab_size, 1);  // the whole sequence, not a shard
  std::string msg = testing::error_message([&] { model.forward(ids, ctx); });
  EXPECT_NE(msg.find("seq_len / cp = 12"), std::string::npos) << msg;
}

}  // namespace
}  // namespace loom
