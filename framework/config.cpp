// The built-in recipe keys: one line per key (name = field path, doc,
// constraints; the default is the field initializer in config.h), then the
// cross-field checks. This is the file to edit when a feature adds a key.
#include "framework/config.h"

#include <fmt/format.h>

#include <filesystem>

#include "framework/error.h"
#include "framework/tasks.h"

namespace loom {

int64_t ModelConfig::effective_n_kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }

int64_t ModelConfig::effective_head_dim() const {
  if (head_dim > 0) return head_dim;
  LOOM_CHECK(n_heads > 0) << "model.n_heads = " << n_heads;
  return d_model / n_heads;
}

int64_t ModelConfig::effective_ffn_hidden() const {
  if (ffn_hidden > 0) return ffn_hidden;
  int64_t hidden = (8 * d_model + 2) / 3;  // ceil(8/3 d_model): SwiGLU at the parameter count of a 4x MLP
  return (hidden + 63) / 64 * 64;          // a multiple of 64 for GEMM tiles
}

std::string ModelConfig::layer_types() const {
  std::string types;
  if (layers.empty()) return types;
  for (int64_t i = 0; i < n_layers; ++i) types += layers[static_cast<size_t>(i) % layers.size()];
  return types;
}

std::string RunConfig::run_dir() const { return (std::filesystem::path(log.dir) / log.name).string(); }

std::string RunConfig::checkpoint_dir() const {
  return checkpoint.dir.empty() ? (std::filesystem::path(run_dir()) / "checkpoints").string() : checkpoint.dir;
}

std::string RunConfig::config_path() const { return (std::filesystem::path(run_dir()) / "config.yaml").string(); }

namespace {

// A number in [0, 1] (data.needle.depths entries).
bool is_fraction(const std::string& text) {
  try {
    size_t used = 0;
    double v = std::stod(text, &used);
    return used == text.size() && v >= 0 && v <= 1;
  } catch (const std::exception&) {
    return false;
  }
}

// A whole number >= 1 (train.eval_lengths entries); 0 when it is not one.
int64_t parse_length(const std::string& text) {
  try {
    size_t used = 0;
    long long v = std::stoll(text, &used);
    return used == text.size() && v >= 1 ? static_cast<int64_t>(v) : 0;
  } catch (const std::exception&) {
    return 0;
  }
}

bool is_device_name(const ConfigValue& value) {
  const auto& s = std::get<std::string>(value);
  if (s == "cpu" || s == "cuda") return true;
  if (s.rfind("cuda:", 0) != 0 || s.size() == 5) return false;
  return s.find_first_not_of("0123456789", 5) == std::string::npos;
}

}  // namespace

void register_run_keys(ConfigSchema& s) {
  // ---- model
  s.add(LOOM_CONFIG_FIELD(model.vocab_size), "vocabulary size (byte tokenizer: 256 bytes + end-of-document)").min(2);
  s.add(LOOM_CONFIG_FIELD(model.d_model), "model width C").min(1);
  s.add(LOOM_CONFIG_FIELD(model.n_layers), "number of blocks L").min(1);
  s.add(LOOM_CONFIG_FIELD(model.n_heads), "attention (query) heads H").min(1);
  s.add(LOOM_CONFIG_FIELD(model.n_kv_heads), "key/value heads Hkv for GQA (0 = n_heads)").min(0);
  s.add(LOOM_CONFIG_FIELD(model.head_dim), "head dim D (0 = d_model / n_heads)").min(0);
  s.add(LOOM_CONFIG_FIELD(model.ffn_hidden), "SwiGLU hidden width (0 = 8/3 d_model rounded up to a multiple of 64)")
      .min(0);
  s.add(LOOM_CONFIG_FIELD(model.layers),
        "layer-type pattern repeated to n_layers (S = softmax attention, L = lightning attention)")
      .letters("SL");
  s.add(LOOM_CONFIG_FIELD(model.ffn), "feed-forward block: dense SwiGLU or mixture of experts").one_of({"dense", "moe"});
  s.add(LOOM_CONFIG_FIELD(model.rope_theta), "RoPE base frequency").above(0);
  s.add(LOOM_CONFIG_FIELD(model.norm_eps), "RMSNorm epsilon").above(0);
  s.add(LOOM_CONFIG_FIELD(model.tie_embeddings), "LM head shares the embedding matrix");
  s.add(LOOM_CONFIG_FIELD(model.init_std), "std of the normal weight init").above(0);
  s.add(LOOM_CONFIG_FIELD(model.max_seq_len), "longest sequence the model supports (RoPE tables)").min(1);
  // softmax-attention (S) options
  s.add(LOOM_CONFIG_FIELD(model.attention_backend),
        "CUDA softmax-attention kernels: auto (per shape, the faster of cudnn and native, timed on first use), "
        "native (flash kernels on tensor cores for bf16 and head dim 64/128, interim elsewhere), cudnn (cuDNN's "
        "fused attention for dense calls it takes, native elsewhere), interim (CUDA cores everywhere)")
      .one_of({"auto", "native", "cudnn", "interim"});
  s.add(LOOM_CONFIG_FIELD(model.S.gate), "S: sigmoid output gate after attention, before o_proj")
      .one_of({"none", "headwise", "elementwise"});
  s.add(LOOM_CONFIG_FIELD(model.S.heads), "S: all heads, or mixture-of-heads routing").one_of({"dense", "moh"});
  s.add(LOOM_CONFIG_FIELD(model.S.moh.shared), "S/MoH: heads always on (h_s)").min(0);
  s.add(LOOM_CONFIG_FIELD(model.S.moh.topk), "S/MoH: routed heads chosen per token (k)").min(1);
  s.add(LOOM_CONFIG_FIELD(model.S.moh.aux_coef), "S/MoH: load-balance loss coefficient").min(0);
  s.add(LOOM_CONFIG_FIELD(model.S.sparsity), "S: dense attention or S2 per-head context shards").one_of({"dense", "s2"});
  s.add(LOOM_CONFIG_FIELD(model.S.s2.block), "S/S2: tokens per block").min(1);
  s.add(LOOM_CONFIG_FIELD(model.S.s2.local_blocks), "S/S2: blocks of the local window").min(1);
  s.add(LOOM_CONFIG_FIELD(model.S.s2.vert_stride), "S/S2: period of each head's strided key blocks").min(1);
  // lightning-attention (L) options
  s.add(LOOM_CONFIG_FIELD(model.L.block), "L: block size of the blocked kernel").min(1);
  s.add(LOOM_CONFIG_FIELD(model.L.qk_activation), "L: activation on q and k").one_of({"silu", "none"});
  s.add(LOOM_CONFIG_FIELD(model.L.short_conv),
        "L: width of a causal depthwise convolution on q, k, v (each token sees its w - 1 predecessors directly; "
        "0 = none)")
      .satisfies([](const ConfigValue& v) { const int64_t w = std::get<int64_t>(v); return w == 0 || w >= 2; },
                 "0 or a width >= 2");
  s.add(LOOM_CONFIG_FIELD(model.L.decay_scale), "L: decay rates lambda_h = scale * h / H * (1 - l / L); 0 = none")
      .min(0);
  s.add(LOOM_CONFIG_FIELD(model.L.output_gate), "L: sigmoid output gate from the block input");
  s.add(LOOM_CONFIG_FIELD(model.L.output_norm), "L: RMSNorm of the attention output");
  // MoE options
  s.add(LOOM_CONFIG_FIELD(model.moe.experts), "MoE: routed experts E").min(1);
  s.add(LOOM_CONFIG_FIELD(model.moe.topk), "MoE: experts per token k").min(1);
  s.add(LOOM_CONFIG_FIELD(model.moe.hidden), "MoE: expert SwiGLU width (0 = ffn_hidden / topk)").min(0);
  s.add(LOOM_CONFIG_FIELD(model.moe.router), "MoE: top-k of logits then softmax over k, or softmax then top-k")
      .one_of({"topk_softmax", "softmax_topk"});
  s.add(LOOM_CONFIG_FIELD(model.moe.aux_coef), "MoE: load-balance loss coefficient").min(0);
  s.add(LOOM_CONFIG_FIELD(model.moe.z_coef), "MoE: router z-loss coefficient").min(0);
  s.add(LOOM_CONFIG_FIELD(model.moe.bias_balance), "MoE: loss-free balancing with a per-expert selection bias");
  s.add(LOOM_CONFIG_FIELD(model.moe.bias_rate), "MoE: bias update per step (u)").min(0);
  s.add(LOOM_CONFIG_FIELD(model.moe.capacity_factor), "MoE: expert capacity factor (0 = dropless)").min(0);
  s.add(LOOM_CONFIG_FIELD(model.moe.shared_experts), "MoE: always-on shared experts").min(0);

  // ---- data
  s.add(LOOM_CONFIG_FIELD(data.task),
        "what to train on: text (token files / data.text), or a synthetic long-context task "
        "(recall = multi-query associative recall, needle = needle retrieval in data.text filler)")
      .one_of({"text", "recall", "needle"});
  s.add(LOOM_CONFIG_FIELD(data.recall.pairs), "recall: key-value pairs per sequence (0 = as many as fit)").min(0);
  s.add(LOOM_CONFIG_FIELD(data.recall.queries), "recall: queried keys per sequence (0 = one per pair)").min(0);
  s.add(LOOM_CONFIG_FIELD(data.recall.draw),
        "recall: how queries pick keys: distinct (each key at most once; the answers given so far narrow the "
        "values left) or replace (independent uniform draws; queries may exceed pairs)")
      .one_of({"distinct", "replace"});
  s.add(LOOM_CONFIG_FIELD(data.recall.format),
        "recall: spaced (\"ab:37 \" per pair, answers after ':') or compact (\"ab37\", answers right after the key)")
      .one_of({"spaced", "compact"});
  s.add(LOOM_CONFIG_FIELD(data.recall.key_len), "recall: letters per key (a-z)").min(1).max(8);
  s.add(LOOM_CONFIG_FIELD(data.recall.value_len), "recall: digits per value (the answer tokens)").min(1).max(8);
  s.add(LOOM_CONFIG_FIELD(data.needle.depths), "needle: evaluated depths of the needle in the context (0 = start, 1 = end)")
      .non_empty()
      .satisfies(
          [](const ConfigValue& v) {
            for (const std::string& d : std::get<std::vector<std::string>>(v))
              if (!is_fraction(d)) return false;
            return true;
          },
          "numbers in [0, 1]");
  s.add(LOOM_CONFIG_FIELD(data.train), "training tokens: path or glob of llm.c .bin shards, or a Megatron prefix");
  s.add(LOOM_CONFIG_FIELD(data.val), "validation tokens, like data.train (\"\" = split off data.val_fraction)");
  s.add(LOOM_CONFIG_FIELD(data.format), "token file format (auto = by file header / extension)")
      .one_of({"auto", "llmc", "megatron"});
  s.add(LOOM_CONFIG_FIELD(data.seq_len), "tokens per training sequence T").min(1);
  s.add(LOOM_CONFIG_FIELD(data.text), "text file(s) tokenized on the fly when data.train is \"\"");
  s.add(LOOM_CONFIG_FIELD(data.val_fraction), "share of data.text held out for validation").min(0).below(1);

  // ---- train
  s.add(LOOM_CONFIG_FIELD(train.steps), "optimizer steps to run").min(1);
  s.add(LOOM_CONFIG_FIELD(train.micro_batch_size), "sequences per rank per micro-batch B").min(1);
  s.add(LOOM_CONFIG_FIELD(train.grad_accum), "micro-batches accumulated per optimizer step").min(1);
  s.add(LOOM_CONFIG_FIELD(train.seed), "seed of init, data order and sampling").min(0);
  s.add(LOOM_CONFIG_FIELD(train.device), "cpu, cuda (the rank's local GPU) or cuda:N")
      .satisfies(is_device_name, "cpu, cuda or cuda:N");
  s.add(LOOM_CONFIG_FIELD(train.dtype), "compute dtype (bf16: CUDA only; master weights stay f32)")
      .one_of({"f32", "bf16"});
  s.add(LOOM_CONFIG_FIELD(train.eval_every), "steps between validation runs (0 = never)").min(0);
  s.add(LOOM_CONFIG_FIELD(train.eval_batches), "micro-batches per validation run").min(1);
  s.add(LOOM_CONFIG_FIELD(train.log_every), "steps between metric log lines").min(1);
  s.add(LOOM_CONFIG_FIELD(train.max_bad_steps), "non-finite steps in a row skipped before the run stops").min(0);
  s.add(LOOM_CONFIG_FIELD(train.resume), "auto (newest complete checkpoint), none, or a checkpoint path").non_empty();
  s.add(LOOM_CONFIG_FIELD(train.sample_every), "steps between text samples (0 = never)").min(0);
  s.add(LOOM_CONFIG_FIELD(train.sample_tokens), "tokens generated per sample").min(1);
  s.add(LOOM_CONFIG_FIELD(train.prompt), "prompt of the text samples");
  s.add(LOOM_CONFIG_FIELD(train.activation_checkpointing), "recompute block activations in backward to save memory");
  s.add(LOOM_CONFIG_FIELD(train.deterministic),
        "bitwise-repeatable kernels: the flash backward without atomics, cuDNN forward only (slower)");
  s.add(LOOM_CONFIG_FIELD(train.eval_lengths),
        "context lengths of the task accuracy evaluation when data.task != text ([] = data.seq_len)")
      .satisfies(
          [](const ConfigValue& v) {
            for (const std::string& l : std::get<std::vector<std::string>>(v))
              if (parse_length(l) == 0) return false;
            return true;
          },
          "whole numbers >= 1");

  // ---- optim
  s.add(LOOM_CONFIG_FIELD(optim.lr), "peak learning rate").min(0);
  s.add(LOOM_CONFIG_FIELD(optim.min_lr), "learning rate at the end of the decay").min(0);
  s.add(LOOM_CONFIG_FIELD(optim.weight_decay), "AdamW decoupled weight decay (matrices only)").min(0);
  s.add(LOOM_CONFIG_FIELD(optim.beta1), "AdamW first-moment decay").min(0).below(1);
  s.add(LOOM_CONFIG_FIELD(optim.beta2), "AdamW second-moment decay").min(0).below(1);
  s.add(LOOM_CONFIG_FIELD(optim.eps), "AdamW epsilon").above(0);
  s.add(LOOM_CONFIG_FIELD(optim.schedule), "learning-rate schedule after warmup (wsd = warmup-stable-decay)")
      .one_of({"constant", "cosine", "linear", "wsd"});
  s.add(LOOM_CONFIG_FIELD(optim.warmup_steps), "linear warmup steps from 0 to optim.lr").min(0);
  s.add(LOOM_CONFIG_FIELD(optim.decay_steps), "wsd: length of the final decay phase (0 = 20% of train.steps)").min(0);
  s.add(LOOM_CONFIG_FIELD(optim.grad_clip), "max global gradient norm (0 = off)").min(0);
  s.add(LOOM_CONFIG_FIELD(optim.zero), "ZeRO-1: shard optimizer state across the dp group");

  // ---- parallel
  s.add(LOOM_CONFIG_FIELD(parallel.dp), "data-parallel ranks (0 = world size / (cp * ep))").min(0);
  s.add(LOOM_CONFIG_FIELD(parallel.cp), "context-parallel ranks (sequence split)").min(1);
  s.add(LOOM_CONFIG_FIELD(parallel.ep), "expert-parallel ranks").min(1);
  s.add(LOOM_CONFIG_FIELD(parallel.layout), "token layout across cp ranks (zigzag balances causal work)")
      .one_of({"contiguous", "zigzag"});
  s.add(LOOM_CONFIG_FIELD(parallel.cp_softmax), "softmax layers under cp: ring attention or LASP-2H all-gather")
      .one_of({"ring", "allgather"});

  // ---- checkpoint
  s.add(LOOM_CONFIG_FIELD(checkpoint.every), "steps between checkpoints (0 = only at the end)").min(0);
  s.add(LOOM_CONFIG_FIELD(checkpoint.keep_last), "newest checkpoints kept (0 = keep all)").min(0);
  s.add(LOOM_CONFIG_FIELD(checkpoint.dir), "checkpoint directory (\"\" = <log.dir>/<log.name>/checkpoints)");

  // ---- log
  s.add(LOOM_CONFIG_FIELD(log.dir), "directory of all runs").non_empty();
  s.add(LOOM_CONFIG_FIELD(log.name), "run name, the run's subdirectory (\"\" = the recipe's file stem, or default)");
  s.add(LOOM_CONFIG_FIELD(log.metrics), "write metrics.jsonl");
  s.add(LOOM_CONFIG_FIELD(log.progress), "progress bar between log lines (auto = when stdout is a terminal and not under mpirun; on = always)")
      .one_of({"auto", "on", "off"});

  // ---- cross-field checks
  s.add_check([](const RunConfig& c) -> std::string {
    const ModelConfig& m = c.model;
    if (m.n_kv_heads > 0 && m.n_heads % m.n_kv_heads != 0) {
      return fmt::format("model.n_heads = {} is not a multiple of model.n_kv_heads = {}", m.n_heads, m.n_kv_heads);
    }
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    const ModelConfig& m = c.model;
    if (m.head_dim == 0 && m.n_heads > 0 && m.d_model % m.n_heads != 0) {
      return fmt::format(
          "model.d_model = {} is not a multiple of model.n_heads = {} (model.head_dim = 0 means "
          "d_model / n_heads; set it explicitly)",
          m.d_model, m.n_heads);
    }
    if (m.n_heads > 0 && m.effective_head_dim() % 2 != 0) {
      return fmt::format(
          "head dim {} (model.head_dim = {}, model.d_model = {}, model.n_heads = {}) must be even for RoPE",
          m.effective_head_dim(), m.head_dim, m.d_model, m.n_heads);
    }
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    if (static_cast<int64_t>(c.model.layers.size()) > c.model.n_layers) {
      return fmt::format("model.layers = \"{}\" has more letters than model.n_layers = {}", c.model.layers,
                         c.model.n_layers);
    }
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    const ModelConfig& m = c.model;
    if (m.S.heads == "moh" && (m.S.moh.shared >= m.n_heads || m.S.moh.topk > m.n_heads - m.S.moh.shared)) {
      return fmt::format(
          "model.S.moh: shared = {} and topk = {} need shared < n_heads = {} and topk <= n_heads - shared = {}",
          m.S.moh.shared, m.S.moh.topk, m.n_heads, m.n_heads - m.S.moh.shared);
    }
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    const MoeOptions& e = c.model.moe;
    if (c.model.ffn != "moe") return "";
    if (e.topk > e.experts)
      return fmt::format("model.moe.topk = {} exceeds model.moe.experts = {}", e.topk, e.experts);
    if (e.topk == 1 && e.router != "softmax_topk")
      return "model.moe.topk = 1 needs model.moe.router = softmax_topk (a softmax over one logit is constant)";
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    if (c.model.L.short_conv == 0 || c.parallel.cp <= 1 || c.model.layer_types().find('L') == std::string::npos)
      return "";
    // Each chunk takes the short_conv - 1 tokens before it from the chunk that ends there.
    const int64_t chunks = c.parallel.layout == "zigzag" ? 2 * c.parallel.cp : c.parallel.cp;
    const int64_t chunk = c.data.seq_len / chunks;
    if (chunk < c.model.L.short_conv - 1)
      return fmt::format("model.L.short_conv = {} needs chunks of at least {} tokens, but data.seq_len = {} over "
                         "parallel.cp = {} ({} layout) gives {}",
                         c.model.L.short_conv, c.model.L.short_conv - 1, c.data.seq_len, c.parallel.cp,
                         c.parallel.layout, chunk);
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    if (c.data.seq_len > c.model.max_seq_len) {
      return fmt::format("data.seq_len = {} exceeds model.max_seq_len = {}", c.data.seq_len, c.model.max_seq_len);
    }
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    if (c.data.task == "text") return "";
    if (c.model.vocab_size < 257) {
      return fmt::format("data.task = {} needs the byte vocabulary: model.vocab_size = {} is below 257", c.data.task,
                         c.model.vocab_size);
    }
    std::vector<int64_t> lengths = {c.data.seq_len};
    for (const std::string& l : c.train.eval_lengths) {
      int64_t length = parse_length(l);
      if (length == 0) return "";  // reported by the key itself
      if (length > c.model.max_seq_len)
        return fmt::format("train.eval_lengths entry {} exceeds model.max_seq_len = {}", length, c.model.max_seq_len);
      lengths.push_back(length);
    }
    for (int64_t length : lengths) {
      std::string what = length == c.data.seq_len ? fmt::format("data.seq_len = {}", length)
                                                  : fmt::format("train.eval_lengths entry {}", length);
      if (c.data.task == "recall") {
        std::string problem;
        recall_layout(c.data.recall, length, &problem);
        if (!problem.empty()) return fmt::format("data.task = recall at {}: {}", what, problem);
      } else if (length < needle_min_seq_len()) {
        return fmt::format("data.task = needle at {}: a sequence needs at least {} tokens (needle, question, answer "
                           "and {} filler bytes)",
                           what, needle_min_seq_len(), kNeedleMinFiller);
      }
    }
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    if (c.optim.min_lr > c.optim.lr) {
      return fmt::format("optim.min_lr = {} exceeds optim.lr = {}", format_config_value(c.optim.min_lr, false),
                         format_config_value(c.optim.lr, false));
    }
    return "";
  });
  s.add_check([](const RunConfig& c) -> std::string {
    if (c.train.dtype == "bf16" && c.train.device == "cpu") {
      return "train.dtype = bf16 needs a CUDA device (train.device = cpu; on CPU everything is f32)";
    }
    return "";
  });
}

const ConfigSchema& config_schema() {
  static const ConfigSchema schema = [] {
    ConfigSchema s;
    register_run_keys(s);
    return s;
  }();
  return schema;
}

}  // namespace loom
