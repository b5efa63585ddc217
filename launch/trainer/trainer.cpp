// The training loop (see trainer.h). One optimizer step:
//   for each of grad_accum micro-batches: loss / grad_accum -> backward
//     (gradient averaging over dp starts from grad-ready hooks on the last one)
//   -> finish the reduction -> skip the step if loss or gradients are not finite
//   -> clip the global norm -> AdamW step at the scheduled lr -> zero grads.
// Batches come from token files (DataLoader) or, when data.task != text, from a
// synthetic task stream (framework/tasks.h) whose position is the number of
// examples consumed; task runs evaluate answer accuracy instead of val loss.
#include "launch/trainer/trainer.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>

#include "framework/data.h"
#include "framework/metrics.h"
#include "framework/ops.h"
#include "framework/tasks.h"
#include "framework/tokenizer.h"
#include "kernels/dispatch.h"
#include "launch/trainer/checkpointing.h"
#include "launch/trainer/task_eval.h"
#include "models/decoder.h"
#include "models/moe_ffn.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "optim/schedule.h"
#include "parallel/comm_stats.h"
#include "parallel/data_parallel.h"
#include "parallel/mesh.h"
#include "parallel/mpi_communicator.h"
#include "parallel/token_layout.h"

namespace loom {

DecoderConfig decoder_config_from(const RunConfig& config) {
  const ModelConfig& m = config.model;
  DecoderConfig d;
  d.vocab_size = m.vocab_size;
  d.d_model = m.d_model;
  d.n_layers = m.n_layers;
  d.n_heads = m.n_heads;
  d.n_kv_heads = m.effective_n_kv_heads();
  d.head_dim = m.effective_head_dim();
  d.ffn_hidden = m.effective_ffn_hidden();
  d.layers = m.layers;
  d.rope_theta = m.rope_theta;
  d.max_seq_len = m.max_seq_len;
  d.norm_eps = m.norm_eps;
  d.tie_embeddings = m.tie_embeddings;
  d.init_std = m.init_std;
  d.activation_checkpointing = config.train.activation_checkpointing;
  d.dtype = DType::f32;
  d.ffn = m.ffn;
  d.softmax = m.S;
  d.lightning = m.L;
  d.moe = m.moe;
  return d;
}

namespace {

Stream& host_stream() { return Stream::default_for(Device::cpu()); }

// Mean of a scalar over the ranks of `comm`.
double mean_over(double value, Communicator& comm) {
  Tensor t = Tensor::scalar(value, DType::f64);
  comm.all_reduce(t, ReduceOp::avg, host_stream());
  return t.item();
}

// The data of a run: prepared from text on rank 0 when data.train is empty.
struct RunData {
  std::shared_ptr<const TokenSource> train, val;
};

RunData open_data(const RunConfig& config, MpiCommunicator& world, std::ostream& out) {
  const int64_t vocab = config.model.vocab_size;
  RunData data;
  std::vector<std::string> train_files, val_files;
  if (config.data.train.empty()) {
    LOOM_CHECK(vocab >= ByteTokenizer::kVocabSize)
        << "model.vocab_size = " << vocab << " is too small for the byte tokenizer used when data.train is empty ("
        << ByteTokenizer::kVocabSize << " ids)";
    std::string dir = (std::filesystem::path(config.run_dir()) / "data").string();
    std::string error;
    if (world.rank() == 0) {
      try {
        std::string text = config.data.text.empty() ? find_demo_corpus() : config.data.text;
        PreparedCorpus corpus = prepare_text_corpus({text}, dir, "corpus", config.data.val_fraction);
        out << fmt::format("data: {} -> {} train tokens, {} val tokens in {}\n", text, corpus.train_tokens,
                           corpus.val_tokens, dir);
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    // Every rank learns whether rank 0 failed, so none waits forever.
    Tensor failed = Tensor::scalar(error.empty() ? 0.0 : 1.0, DType::i64);
    world.all_reduce(failed, ReduceOp::max, host_stream());
    LOOM_CHECK(failed.item() == 0) << (error.empty() ? std::string("data preparation failed on rank 0") : error);
    data.train = std::make_shared<TokenSource>(dir + "/corpus_train_*.bin", vocab);
    if (config.data.val_fraction > 0) data.val = std::make_shared<TokenSource>(dir + "/corpus_val_*.bin", vocab);
  } else {
    data.train = std::make_shared<TokenSource>(config.data.train, vocab);
    if (!config.data.val.empty()) data.val = std::make_shared<TokenSource>(config.data.val, vocab);
  }
  return data;
}

LrSchedule schedule_from(const RunConfig& config) {
  LrSchedule s;
  s.kind = lr_schedule_kind_from_name(config.optim.schedule);
  s.lr = config.optim.lr;
  s.min_lr = config.optim.min_lr;
  s.total_steps = config.train.steps;
  s.warmup_steps = std::min(config.optim.warmup_steps, config.train.steps);
  s.decay_steps = config.optim.decay_steps > 0 ? config.optim.decay_steps
                                               : std::max<int64_t>(1, config.train.steps / 5);
  if (s.kind == LrScheduleKind::wsd) s.decay_steps = std::min(s.decay_steps, s.total_steps - s.warmup_steps);
  s.validate();
  return s;
}

// Sequence parallelism of a run: the cp group, its token layout and byte
// counters; inactive at cp = 1 (the single-device path, unchanged).
struct CpSetup {
  SequenceParallel sp;  // what every training/eval forward gets in its SequenceContext
  std::unique_ptr<CommStats> stats;

  // This rank's shard of a batch: targets were shifted before sharding, so
  // every token keeps its own next-token target.
  Batch shard(Batch batch) const {
    if (!sp.active()) return batch;
    const int rank = sp.comm->rank();
    batch.inputs = sp.layout->shard(batch.inputs, rank, 1);    // (B, T/P)
    batch.targets = sp.layout->shard(batch.targets, rank, 1);  // (B, T/P)
    return batch;
  }
  SequenceContext context() const {
    SequenceContext ctx;
    ctx.cp = sp;
    return ctx;
  }
};

// Mean validation loss over eval_batches batches (all ranks; cp shares summed,
// dp shards averaged: the mean over dp_cp of the shares times cp).
double evaluate(const DecoderLM& model, DataLoader& loader, int64_t batches, const CpSetup& cp, Communicator& dp_cp) {
  NoGradGuard no_grad;
  loader.reset();
  double total = 0;
  int64_t n = std::min<int64_t>(batches, loader.steps_per_epoch());
  for (int64_t i = 0; i < n; ++i) {
    Batch batch = cp.shard(loader.next());
    SequenceContext ctx = cp.context();
    total += model.loss(batch.inputs, batch.targets, ctx).item();
  }
  return mean_over(total / static_cast<double>(std::max<int64_t>(n, 1)), dp_cp) * cp.sp.size();
}

// The training batches: windows of token files, or examples of a task stream.
class TrainStream {
 public:
  TrainStream(std::unique_ptr<DataLoader> loader, std::unique_ptr<TaskDataset> task, const RunConfig& config)
      : loader_(std::move(loader)), task_(std::move(task)), config_(config) {}

  Batch next() {
    if (loader_) return loader_->next();
    Batch batch = task_->batch(examples_, config_.data.seq_len);
    examples_ += task_->global_batch();
    return batch;
  }
  // What the checkpoint index stores as "data": the loader state, or the task stream position.
  nlohmann::json state() const {
    if (loader_) return loader_->state().to_json();
    return {{"task", config_.data.task}, {"examples", examples_}, {"seed", config_.train.seed}};
  }
  void set_state(const nlohmann::json& state) {
    const bool saved_task = state.contains("task");
    std::string saved = saved_task ? state.at("task").get<std::string>() : "text";
    LOOM_CHECK(saved == config_.data.task) << "the checkpoint was written by a run with data.task = " << saved
                                           << ", this run has data.task = " << config_.data.task;
    if (loader_) {
      loader_->set_state(DataLoaderState::from_json(state));
      return;
    }
    LOOM_CHECK(state.at("seed").get<int64_t>() == config_.train.seed)
        << "the checkpoint's task stream has train.seed = " << state.at("seed").get<int64_t>()
        << ", this run has train.seed = " << config_.train.seed;
    examples_ = state.at("examples").get<int64_t>();
  }
  const TaskDataset* task() const { return task_.get(); }

 private:
  std::unique_ptr<DataLoader> loader_;
  std::unique_ptr<TaskDataset> task_;
  const RunConfig& config_;
  int64_t examples_ = 0;  // task stream: global examples consumed
};

// Per-step sums of what the layers report besides the loss (averaged at log time).
// Values still on the device are kept until settle(), called once the step's
// losses have been read: no host wait between micro-batches.
struct StepExtras {
  double aux = 0;                        // sum over micro-batches of sum(ctx.aux_losses)
  std::map<std::string, double> stats;  // sums over micro-batches of ctx.stats and ctx.deferred_stats

  void add(const SequenceContext& ctx) {
    for (const Variable& a : ctx.aux_losses) pending_aux_.push_back(a.data());
    for (const auto& [name, value] : ctx.stats) stats[name] += value;
    for (const auto& [name, d] : ctx.deferred_stats) pending_stats_.emplace_back(name, d);
  }
  // Reads the pending values in the order they came (the same sums as reading them at once).
  void settle() {
    for (const Tensor& a : pending_aux_) aux += a.item();
    for (const auto& [name, d] : pending_stats_) stats[name] += d.read();
    pending_aux_.clear();
    pending_stats_.clear();
  }

 private:
  std::vector<Tensor> pending_aux_;
  std::vector<std::pair<std::string, SequenceContext::DeferredStat>> pending_stats_;
};

// Stats averaged over micro-batches and the ranks of `dp` (the dp_cp group under cp: every
// rank's model reports the same names; per-token means of equal shards average to the global mean).
nlohmann::json mean_stats(const StepExtras& extras, int64_t micro_batches, Communicator& dp) {
  nlohmann::json out = nlohmann::json::object();
  if (extras.stats.empty()) return out;
  std::vector<double> values;
  for (const auto& [name, v] : extras.stats) values.push_back(v / static_cast<double>(micro_batches));
  Tensor t = Tensor::from_vector(values, {static_cast<int64_t>(values.size())});
  dp.all_reduce(t, ReduceOp::avg, host_stream());
  std::vector<double> mean = t.to_vector<double>();
  size_t i = 0;
  for (const auto& [name, v] : extras.stats) out[name] = mean[i++];
  return out;
}

std::string sample_text(const DecoderLM& model, const RunConfig& config, int64_t step) {
  ByteTokenizer tokenizer;
  std::vector<int32_t> prompt32 = tokenizer.encode(config.train.prompt);
  std::vector<int64_t> prompt(prompt32.begin(), prompt32.end());
  if (prompt.empty()) prompt.push_back(ByteTokenizer::kEndOfDocument);
  std::vector<int64_t> continuation =
      generate(model, prompt, config.train.sample_tokens, 0.8, static_cast<uint64_t>(config.train.seed + step),
               config.data.seq_len);
  for (int64_t& id : continuation) id = std::min<int64_t>(id, ByteTokenizer::kEndOfDocument);
  std::string text = config.train.prompt + tokenizer.decode(std::span<const int64_t>(continuation), "\n");
  // One printable line: control and non-ASCII bytes (an untrained model emits any byte) become '?'.
  for (char& c : text) {
    auto u = static_cast<unsigned char>(c);
    if (c == '\n' || c == '\t') c = ' ';
    else if (u < 0x20 || u >= 0x7f) c = '?';
  }
  return text;
}

}  // namespace

TrainSummary run_training(const RunConfig& config, MpiCommunicator& world, std::ostream& out) {
  const bool is_root = world.rank() == 0;
  std::ostream null_stream(nullptr);
  std::ostream& log = is_root ? out : null_stream;

  // ---- mesh and device ----
  LOOM_CHECK(config.parallel.ep == 1) << "parallel.ep = " << config.parallel.ep
                                      << ": expert parallelism is not available yet (use ep = 1)";
  // -- device placement (CUDA): this rank's device (node-local rank -> GPU); the mesh routes CUDA tensors to NCCL --
  LOOM_CHECK(config.train.device == "cpu" || cuda_is_available())
      << "train.device = \"" << config.train.device << "\" but CUDA is not usable here: " << cuda_unavailable_reason();
  const Device device = select_device(config.train.device, world);
  dispatch::set_attention_backend(dispatch::attention_backend_from_name(config.model.attention_backend));
  dispatch::set_deterministic(config.train.deterministic);
  MeshSizes sizes;
  sizes.dp = static_cast<int>(config.parallel.dp);
  sizes.cp = static_cast<int>(config.parallel.cp);
  sizes.ep = static_cast<int>(config.parallel.ep);
  DeviceMesh mesh(sizes, world, device);
  Communicator& dp = mesh.group("dp");
  const int64_t dp_size = mesh.sizes().dp;
  // Sequence parallelism (cp ranks are contiguous in the world: see parallel/mesh.h).
  // Under cp, each rank's loss is its share of its dp group's loss, so the
  // parameter gradients are SUMMED over cp and averaged over dp: one sum over
  // dp_cp of gradients of share / dp (the scaling in the step below).
  Communicator& dp_cp = mesh.group("dp_cp");
  const int64_t cp_size = mesh.sizes().cp;
  CpSetup cp;
  if (cp_size > 1) {
    LOOM_CHECK(config.parallel.cp_softmax == "ring" || config.parallel.cp_softmax == "allgather")
        << "parallel.cp_softmax = \"" << config.parallel.cp_softmax << "\" is not one of ring, allgather";
    cp.sp.layout = std::make_shared<TokenLayout>(parse_layout_kind(config.parallel.layout), config.data.seq_len,
                                                 static_cast<int>(cp_size));  // rejects seq_len not divisible
    cp.sp.comm = &mesh.group("cp");
    cp.sp.softmax = config.parallel.cp_softmax;
    cp.stats = std::make_unique<CommStats>(*cp.sp.comm);
    cp.sp.stats = cp.stats.get();
  }

  if (is_root) {
    log << config_table(config);
    write_resolved(config, config.config_path());
  }

  // ---- data ----
  const int64_t seq_len = config.data.seq_len, micro = config.train.micro_batch_size;
  const bool is_task = config.data.task != "text";
  std::unique_ptr<DataLoader> val_loader;
  std::unique_ptr<TrainStream> train_stream;
  if (is_task) {
    // Generated in-process: nothing to prepare (needle reads its filler text on every rank).
    auto task = std::make_unique<TaskDataset>(task_spec_from(config.data), static_cast<uint64_t>(config.train.seed),
                                              micro * dp_size, mesh.coord().dp, dp_size);
    train_stream = std::make_unique<TrainStream>(nullptr, std::move(task), config);
    log << fmt::format("data: synthetic task {} at {} tokens\n", config.data.task, seq_len);
  } else {
    RunData data = open_data(config, world, log);
    DataLoaderOptions train_options;
    train_options.seq_len = seq_len;
    train_options.global_batch = micro * dp_size;
    train_options.dp_rank = mesh.coord().dp;
    train_options.dp_size = dp_size;
    train_options.seed = static_cast<uint64_t>(config.train.seed);
    auto train_loader = std::make_unique<DataLoader>(data.train, train_options);
    if (data.val && config.train.eval_every > 0) {
      DataLoaderOptions val_options = train_options;
      val_options.shuffle = false;
      val_loader = std::make_unique<DataLoader>(data.val, val_options);
    }
    train_stream = std::make_unique<TrainStream>(std::move(train_loader), nullptr, config);
  }
  const std::vector<int64_t> eval_lengths = task_eval_lengths(config);

  // ---- model and optimizer ----
  DecoderLM model(decoder_config_from(config));
  model.initialize(static_cast<uint64_t>(config.train.seed), config.model.init_std, config.model.n_layers);
  std::vector<Parameter> params = model.named_parameters();
  broadcast_parameters(params, world);  // replicas start identical even if init ever depended on the rank
  // -- device placement (CUDA): initialized in f32 on the host (same values as a CPU run), then moved; with
  // train.dtype = bf16 the parameters become bf16 compute weights and AdamW keeps their f32 masters --
  if (device.is_cuda()) {
    model.to(device);
    if (config.train.dtype != "f32") model.to(dtype_from_name(config.train.dtype));
  }
  AdamWConfig adamw;
  adamw.beta1 = config.optim.beta1;
  adamw.beta2 = config.optim.beta2;
  adamw.eps = config.optim.eps;
  adamw.weight_decay = config.optim.weight_decay;
  // optim.zero: ZeRO-1, the optimizer state sharded over the dp group (replicated over cp).
  AdamW optimizer(params, adamw, config.optim.zero ? &dp : nullptr);
  if (optimizer.sharded())
    log << fmt::format("optimizer: ZeRO-1 over {} dp ranks, {} state elements on this rank\n", dp_size,
                       optimizer.state_elements());
  LrSchedule schedule = schedule_from(config);
  std::unique_ptr<GradReducer> reducer;
  if (cp_size > 1) {
    GradReducerOptions sum_options;
    sum_options.reduce_op = ReduceOp::sum;  // cp shares add up; the 1/dp is in the loss scaling
    reducer = std::make_unique<GradReducer>(params, dp_cp, sum_options);
  } else if (dp_size > 1) {
    reducer = std::make_unique<GradReducer>(params, dp);
  }

  // ---- resume ----
  TrainingCounters counters;
  TrainSummary summary;
  if (auto dir = resume_checkpoint(config, world)) {
    counters = load_checkpoint(*dir, model, optimizer);
    train_stream->set_state(counters.loader_state);
    log << fmt::format("resumed from {} at step {}\n", *dir, counters.step);
  }
  summary.start_step = counters.step;
  LOOM_CHECK(counters.step <= config.train.steps) << "checkpoint step " << counters.step << " is past train.steps = "
                                                  << config.train.steps;

  const int64_t tokens_per_step = micro * seq_len * dp_size * config.train.grad_accum;
  const double flops_per_token = model.training_flops_per_token(seq_len);
  log << fmt::format(
      "model: {} parameters ({} in matrix products), layers \"{}\", {} ranks (dp {}, cp {}), {} tokens per step\n"
      "MFU = tokens/s x {:.4g} FLOP/token / peak (6 x {} active params + attention, ALGORITHMS.md §11)\n",
      model.num_parameters(), model.active_parameters(), config.model.layer_types(), world.size(), dp_size, cp_size,
      tokens_per_step, flops_per_token, model.active_parameters());

  std::unique_ptr<MetricsLog> metrics;
  if (is_root && config.log.metrics)
    metrics = std::make_unique<MetricsLog>((std::filesystem::path(config.run_dir()) / "metrics.jsonl").string());
  const bool progress_bar =
      is_root && (config.log.progress == "on" || (config.log.progress == "auto" && stdout_is_terminal()));
  ProgressMeter meter(counters.step, config.train.steps);
  auto run_start = std::chrono::steady_clock::now();

  auto run_task_eval = [&](int64_t step) {
    TaskEvalResult result = evaluate_task(model, *train_stream->task(), eval_lengths, config.data.needle.depths,
                                          config.train.eval_batches, dp);
    double mean = result.mean_accuracy();
    if (summary.first_task_accuracy < 0) summary.first_task_accuracy = mean;
    summary.last_task_accuracy = mean;
    summary.task_evals.push_back(result.to_json());
    if (is_root) {
      if (progress_bar) log << "\r\033[K";
      log << fmt::format("eval step {}: {} accuracy {:.3f}\n{}", step, result.task, mean, result.table());
      nlohmann::json record = result.to_json();
      record["step"] = step;
      if (metrics) metrics->write(record);
    }
  };

  auto run_eval = [&](int64_t step) {
    if (is_task) return run_task_eval(step);
    if (!val_loader) return;
    double val = evaluate(model, *val_loader, config.train.eval_batches, cp, dp_cp);
    if (summary.first_val_loss < 0) summary.first_val_loss = val;
    summary.last_val_loss = val;
    nlohmann::json record = {{"step", step}, {"val_loss", val}};
    if (is_root) {
      if (progress_bar) log << "\r\033[K";
      log << fmt::format("eval step {}: val loss {:.4f}\n", step, val);
      if (config.train.sample_every > 0 && config.train.sample_tokens > 0) {
        std::string text = sample_text(model, config, step);
        log << "sample: " << text << "\n";
        record["sample"] = text;
      }
      if (metrics) metrics->write(record);
    }
  };

  const bool evaluates = val_loader || (is_task && config.train.eval_every > 0);
  if (counters.step == 0 && evaluates) run_eval(0);

  while (counters.step < config.train.steps) {
    const int64_t step = counters.step;
    const double lr = schedule.lr_at(step);
    double loss_sum = 0;
    std::vector<Tensor> micro_losses;  // one scalar per micro-batch, on the device
    StepExtras extras;
    if (cp.stats) cp.stats->reset();  // bytes of this step
    // Under cp the gradients are summed over dp_cp, so each share is scaled by 1/dp here.
    const double grad_scale = 1.0 / static_cast<double>(config.train.grad_accum * (cp_size > 1 ? dp_size : 1));
    for (int64_t k = 0; k < config.train.grad_accum; ++k) {
      bool last = k + 1 == config.train.grad_accum;
      if (reducer) reducer->set_sync(last);
      Batch batch = cp.shard(train_stream->next());
      if (device.is_cuda()) {  // -- device placement (CUDA): queued uploads, no host wait --
        batch.inputs = batch.inputs.to(device);
        batch.targets = batch.targets.to(device);
      }
      SequenceContext ctx = cp.context();
      Variable loss = model.loss(batch.inputs, batch.targets, ctx);  // cross-entropy + sum(ctx.aux_losses)
      micro_losses.push_back(loss.data());  // read after backward: no host wait between forward and backward
      extras.add(ctx);
      scale(loss, grad_scale).backward();
    }
    if (reducer) reducer->finish();
    // Host sync (CUDA): the step's loss is needed on the host to log it and to skip non-finite steps.
    for (const Tensor& l : micro_losses) loss_sum += l.item();
    extras.settle();
    const double micro_batches = static_cast<double>(config.train.grad_accum);
    // One all-reduce for the total and the aux part; "loss" below is the LM loss alone.
    // Under cp: the shares' mean over dp_cp times cp = the dp mean of whole-sequence losses.
    Tensor sums = Tensor::from_vector(std::vector<double>{loss_sum / micro_batches * static_cast<double>(cp_size),
                                                          extras.aux / micro_batches * static_cast<double>(cp_size)},
                                      {2});
    dp_cp.all_reduce(sums, ReduceOp::avg, host_stream());
    const std::vector<double> means = sums.to_vector<double>();
    const double aux_loss = means[1];
    double loss = means[0] - aux_loss;

    // After the reduction every rank holds the same gradients, so the verdict agrees.
    bool finite = std::isfinite(loss) && grads_finite(params);
    double grad_norm = std::nan("");
    if (finite) {
      grad_norm = clip_grad_norm(params, config.optim.grad_clip);
      optimizer.step(lr);
      // Loss-free MoE balancing: every rank applies the same bias update from the dp-summed loads.
      update_moe_balance_biases(model, [&](Tensor& load) { dp_cp.all_reduce(load, ReduceOp::sum, host_stream()); });
      counters.bad_steps_in_a_row = 0;
    } else {
      counters.skipped_steps += 1;
      counters.bad_steps_in_a_row += 1;
      log << fmt::format("step {}: non-finite loss or gradients (loss {}), step skipped ({} in a row)\n", step + 1,
                         loss, counters.bad_steps_in_a_row);
      LOOM_CHECK(counters.bad_steps_in_a_row <= config.train.max_bad_steps)
          << counters.bad_steps_in_a_row << " non-finite steps in a row (train.max_bad_steps = "
          << config.train.max_bad_steps << "); last loss " << loss << " at step " << step + 1;
    }
    optimizer.zero_grad();
    counters.step += 1;
    counters.tokens += tokens_per_step;
    summary.losses.push_back(loss);
    summary.aux_losses.push_back(aux_loss);
    summary.grad_norms.push_back(grad_norm);
    meter.step_done(counters.step, tokens_per_step);

    bool log_now = config.train.log_every > 0 &&
                   (counters.step % config.train.log_every == 0 || counters.step == config.train.steps);
    nlohmann::json stats;
    if (log_now) stats = mean_stats(extras, config.train.grad_accum, dp_cp);  // collective: every rank
    if (log_now && is_root) {
      double tok_s = meter.tokens_per_second();
      double flops = tok_s * flops_per_token;
      MemoryStats mem = memory_stats(device);  // -- device placement (CUDA): the device's allocator stats --
      // MFU is against the GPU's dense bf16 peak (989 TFLOP/s on H100).
      std::string mfu = device.is_cuda() ? fmt::format("{:.1f}%", 100.0 * flops / 989e12) : "n/a on cpu";
      if (progress_bar) log << "\r\033[K";
      log << fmt::format(
          "step {}/{} | loss {:.4f} | lr {:.3e} | grad-norm {:.3f} | {} tok/s | {:.3g} GFLOP/s, MFU {} | mem {} "
          "(peak {}) | ETA {}\n",
          counters.step, config.train.steps, loss, lr, grad_norm, format_count(tok_s), flops / 1e9, mfu,
          format_bytes(static_cast<double>(mem.current_bytes)), format_bytes(static_cast<double>(mem.peak_bytes)),
          format_duration(meter.seconds_remaining()));
      if (metrics) {
        // Bytes rank 0 sent in this step's sequence-parallel traffic, per layer type
        // ("L": LASP-2, "S": ring/all-gather attention and MoH statistics, "moe", "loss").
        nlohmann::json comm_bytes = nlohmann::json::object();
        if (cp.stats)
          for (const auto& [key, bytes] : cp.stats->bytes()) comm_bytes[key] = bytes;
        double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
        metrics->write({{"step", counters.step}, {"loss", loss}, {"lr", lr},
                        {"grad_norm", std::isfinite(grad_norm) ? nlohmann::json(grad_norm) : nlohmann::json()},
                        {"tokens", counters.tokens}, {"tokens_per_s", tok_s}, {"flops_per_token", flops_per_token},
                        {"flops_per_s", flops},
                        {"mfu", device.is_cuda() ? nlohmann::json(flops / 989e12) : nlohmann::json()},
                        {"mem_bytes", mem.current_bytes},
                        {"mem_peak_bytes", mem.peak_bytes}, {"elapsed_s", elapsed},
                        {"eta_s", meter.seconds_remaining()}, {"skipped_steps", counters.skipped_steps},
                        {"aux_loss", aux_loss}, {"stats", stats}, {"comm_bytes", comm_bytes}});
      }
      meter.window_reset();
    } else if (progress_bar) {
      log << "\r\033[K" << meter.bar() << std::flush;
    }

    if (config.train.eval_every > 0 && counters.step % config.train.eval_every == 0 &&
        counters.step != config.train.steps)
      run_eval(counters.step);
    bool last_step = counters.step == config.train.steps;
    if (last_step || (config.checkpoint.every > 0 && counters.step % config.checkpoint.every == 0)) {
      counters.loader_state = train_stream->state();
      summary.last_checkpoint = save_checkpoint(config, model, optimizer, counters, world);
      if (is_root) {
        if (progress_bar) log << "\r\033[K";
        log << "checkpoint: " << summary.last_checkpoint << "\n";
      }
    }
  }
  if (summary.start_step < config.train.steps || evaluates) run_eval(counters.step);
  summary.final_step = counters.step;
  summary.skipped_steps = counters.skipped_steps;
  if (is_root && summary.first_val_loss >= 0)
    log << fmt::format("done: {} steps, val loss {:.4f} -> {:.4f}\n", counters.step, summary.first_val_loss,
                       summary.last_val_loss);
  if (is_root && summary.first_task_accuracy >= 0)
    log << fmt::format("done: {} steps, {} accuracy {:.3f} -> {:.3f}\n", counters.step, config.data.task,
                       summary.first_task_accuracy, summary.last_task_accuracy);
  return summary;
}

}  // namespace loom
