// Run configuration: the typed RunConfig (one struct per recipe section), the
// declarative key schema bound to its fields, and loading from a YAML recipe
// plus `section.key=value` overrides.
//
// One fact, one place: a key's default is its field initializer below (so
// `RunConfig{}` is the all-defaults config and `ModelConfig{}` is usable on its
// own); its doc, type and allowed values are its registration in config.cpp.
// The schema drives everything else: parsing, type / range / enum errors,
// unknown-key suggestions, cross-field checks, the start-up table, config.yaml.
//
// Adding a key: add the field here, then one line in register_run_keys()
// (config.cpp):  s.add(LOOM_CONFIG_FIELD(train.steps), "optimizer steps to run").min(1);
// The dotted key is the field's path in RunConfig, at any depth (model.S.gate
// for a field `gate` of a member `S` of ModelConfig).
// Higher layers extend a copy of config_schema() (new layer letters, enum
// values, keys, checks) and pass it to the functions that take a schema.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

namespace loom {

// model.S.*: options of the softmax-attention mixer (ALGORITHMS.md §7-§9).
struct MohOptions {
  int64_t shared = 1;       // h_s: heads always on
  int64_t topk = 2;         // k of the E = H - h_s routed heads chosen per token
  double aux_coef = 0.01;   // load-balance loss coefficient (averaged over layers)
  bool operator==(const MohOptions&) const = default;
};
struct S2Options {
  int64_t block = 64;         // Bs: tokens per block
  int64_t local_blocks = 16;  // blocks of the local window
  int64_t vert_stride = 8;    // period of each head's strided shard
  bool operator==(const S2Options&) const = default;
};
struct SoftmaxOptions {
  std::string gate = "none";      // none | headwise | elementwise (sigmoid output gate)
  std::string heads = "dense";    // dense | moh (mixture-of-heads routing)
  MohOptions moh;
  std::string sparsity = "dense";  // dense | s2 (heterogeneous per-head context shards)
  S2Options s2;
  bool operator==(const SoftmaxOptions&) const = default;
};
// model.L.*: options of the lightning-attention mixer (ALGORITHMS.md §4).
struct LightningOptions {
  int64_t block = 64;                // Bk of the blocked kernel
  std::string qk_activation = "silu";  // silu | none, applied to q and k
  double decay_scale = 8.0;          // lambda_h = decay_scale * h / H * (1 - l / L); 0 = no decay
  bool output_gate = true;           // sigmoid gate from the block input on the output
  bool output_norm = true;           // RMSNorm of the attention output before the gate
  int64_t short_conv = 0;            // causal depthwise convolution width on q, k, v (0 = none)
  bool operator==(const LightningOptions&) const = default;
};
// model.moe.*: the MoE feed-forward block (ALGORITHMS.md §10), used when model.ffn = moe.
struct MoeOptions {
  int64_t experts = 8;                 // E
  int64_t topk = 2;                    // k experts per token
  int64_t hidden = 0;                  // expert SwiGLU width (0 = model.ffn_hidden / topk, multiple of 16)
  std::string router = "topk_softmax";  // topk_softmax (top-k logits, softmax over k) | softmax_topk
  double aux_coef = 0.01;              // load-balance loss coefficient
  double z_coef = 0.001;               // router z-loss coefficient
  bool bias_balance = false;           // loss-free balancing: per-expert selection bias
  double bias_rate = 0.001;            // u: bias update per step
  double capacity_factor = 0.0;        // 0 = dropless; else capacity ceil(T k / E * cf) with dropping
  int64_t shared_experts = 0;          // experts every token goes through
  bool operator==(const MoeOptions&) const = default;
};

struct ModelConfig {
  int64_t vocab_size = 257;
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;  // 0 = n_heads
  int64_t head_dim = 0;    // 0 = d_model / n_heads
  int64_t ffn_hidden = 0;  // 0 = 8/3 d_model rounded up to a multiple of 64
  std::string layers = "S";
  std::string ffn = "dense";
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  bool tie_embeddings = true;
  double init_std = 0.02;
  int64_t max_seq_len = 2048;
  // CUDA softmax-attention kernels: auto | native (flash, tensor cores) | interim
  // (kernels/dispatch.h); a run-time choice, not part of the model's weights.
  std::string attention_backend = "auto";
  SoftmaxOptions S;
  LightningOptions L;
  MoeOptions moe;

  // The sizes the model is built with, zeros resolved.
  int64_t effective_n_kv_heads() const;
  int64_t effective_head_dim() const;
  int64_t effective_ffn_hidden() const;
  // One letter per layer: `layers` repeated and cut to n_layers ("LLS", 5 -> "LLSLL").
  std::string layer_types() const;

  bool operator==(const ModelConfig&) const = default;
};

// data.recall.*: multi-query associative recall (framework/tasks.h).
struct RecallOptions {
  int64_t pairs = 0;      // key-value pairs per sequence (0 = as many as fit seq_len)
  int64_t queries = 0;    // queries per sequence (0 = one per pair)
  int64_t key_len = 2;    // letters per key
  int64_t value_len = 2;  // digits per value
  // How queries pick their keys: distinct (each key at most once, in random
  // order) or replace (each query draws a key uniformly, independently: answers
  // already given tell nothing about the next one).
  std::string draw = "distinct";
  // spaced: "ab:37 " per pair (the answer follows ':'); compact: "ab37" (the
  // answer follows the key's last letter, as in MQAR's key-value token pairs).
  std::string format = "spaced";
  bool operator==(const RecallOptions&) const = default;
};
// data.needle.*: needle retrieval in corpus filler (framework/tasks.h).
struct NeedleOptions {
  std::vector<std::string> depths = {"0.1", "0.5", "0.9"};  // evaluated depths in [0, 1]
  bool operator==(const NeedleOptions&) const = default;
};

struct DataConfig {
  std::string task = "text";  // text | recall | needle
  RecallOptions recall;
  NeedleOptions needle;
  std::string train;
  std::string val;
  std::string format = "auto";
  int64_t seq_len = 256;
  std::string text;
  double val_fraction = 0.05;

  bool operator==(const DataConfig&) const = default;
};

struct TrainConfig {
  int64_t steps = 200;
  int64_t micro_batch_size = 8;
  int64_t grad_accum = 1;
  int64_t seed = 1234;
  std::string device = "cpu";
  std::string dtype = "f32";
  int64_t eval_every = 50;
  int64_t eval_batches = 8;
  int64_t log_every = 10;
  int64_t max_bad_steps = 5;
  std::string resume = "auto";
  int64_t sample_every = 100;
  int64_t sample_tokens = 64;
  std::string prompt = "The hacker";
  bool activation_checkpointing = false;
  bool deterministic = false;  // kernels that repeat bitwise (kernels/dispatch.h: set_deterministic)
  std::vector<std::string> eval_lengths;  // task evaluation context lengths ([] = data.seq_len)

  bool operator==(const TrainConfig&) const = default;
};

struct OptimConfig {
  double lr = 3e-3;
  double min_lr = 3e-4;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  std::string schedule = "cosine";
  int64_t warmup_steps = 20;
  int64_t decay_steps = 0;
  double grad_clip = 1.0;
  bool zero = false;

  bool operator==(const OptimConfig&) const = default;
};

struct ParallelConfig {
  int64_t dp = 0;  // 0 = world size / (cp * ep)
  int64_t cp = 1;
  int64_t ep = 1;
  std::string layout = "zigzag";
  std::string cp_softmax = "ring";

  bool operator==(const ParallelConfig&) const = default;
};

struct CheckpointConfig {
  int64_t every = 100;
  int64_t keep_last = 3;
  std::string dir;  // "" = <log.dir>/<log.name>/checkpoints (see RunConfig::checkpoint_dir)

  bool operator==(const CheckpointConfig&) const = default;
};

struct LogConfig {
  std::string dir = "runs";
  std::string name;  // "" = the recipe's file stem, or "default"; resolved by load_config
  bool metrics = true;
  std::string progress = "auto";

  bool operator==(const LogConfig&) const = default;
};

struct RunConfig {
  ModelConfig model;
  DataConfig data;
  TrainConfig train;
  OptimConfig optim;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  LogConfig log;

  std::string run_dir() const;         // <log.dir>/<log.name>
  std::string checkpoint_dir() const;  // checkpoint.dir, or <run_dir>/checkpoints
  std::string config_path() const;     // <run_dir>/config.yaml

  bool operator==(const RunConfig&) const = default;
};

// ---------------------------------------------------------------------------
// Schema

// A key's value; the alternative matches the key's field type.
using ConfigValue = std::variant<int64_t, double, bool, std::string, std::vector<std::string>>;

// int64_t, double, bool, std::string (string, or enum once one_of() is given)
// and std::vector<std::string>.
enum class KeyType { integer, real, boolean, string, choice, string_list };
const char* key_type_name(KeyType type);  // "int", "float", "bool", "string", "enum", "string list"

// A value as the table and config.yaml show it: strings in double quotes with
// quoted(), floats in shortest round-trip form with a '.' ("10000.0", "1.0e-05").
std::string format_config_value(const ConfigValue& value, bool quoted);

class ConfigKey {
 public:
  // ---- constraints, chained at registration (or by an extension) ----
  ConfigKey& min(double lo);                            // value >= lo (int, float)
  ConfigKey& max(double hi);                            // value <= hi
  ConfigKey& above(double lo);                          // value > lo
  ConfigKey& below(double hi);                          // value < hi
  ConfigKey& one_of(std::vector<std::string> allowed);  // string -> enum with these values
  ConfigKey& allow(const std::string& value);           // one more enum value
  // string: non-empty, each character one of `letters` (repeated calls add letters).
  ConfigKey& letters(const std::string& letters);
  ConfigKey& non_empty();  // string, string list
  // Any other rule: `ok(value)` must hold; `allowed` says what is allowed ("cpu, cuda or cuda:N").
  ConfigKey& satisfies(std::function<bool(const ConfigValue&)> ok, std::string allowed);

  const std::string& name() const { return name_; }
  KeyType type() const { return type_; }
  const std::string& doc() const { return doc_; }
  const ConfigValue& default_value() const { return default_; }
  const std::vector<std::string>& allowed_values() const { return allowed_; }

  ConfigValue get(const RunConfig& config) const { return get_(config); }
  void set(RunConfig& config, const ConfigValue& value) const;  // value of the key's type
  // "" when `value` satisfies every constraint, else what is wrong and what is
  // allowed ("out of range (allowed: >= 1)").
  std::string violation(const ConfigValue& value) const;
  // The type with its constraints: "int >= 1", "enum: f32 | bf16", "string of letters S".
  std::string allowed_text() const;

 private:
  friend class ConfigSchema;
  std::string name_;
  KeyType type_ = KeyType::string;
  std::string doc_;
  ConfigValue default_;
  std::function<ConfigValue(const RunConfig&)> get_;
  std::function<void(RunConfig&, const ConfigValue&)> set_;
  bool has_lo_ = false, lo_open_ = false, has_hi_ = false, hi_open_ = false;
  double lo_ = 0, hi_ = 0;
  std::vector<std::string> allowed_;
  std::string letters_;
  bool non_empty_ = false;
  std::vector<std::pair<std::function<bool(const ConfigValue&)>, std::string>> rules_;
};

// `LOOM_CONFIG_FIELD(train.steps)` -> the key name "train.steps" and an accessor
// of RunConfig::train.steps, as ConfigSchema::add expects them.
#define LOOM_CONFIG_FIELD(path) \
#path, +[](::loom::RunConfig & c) -> auto& { return c.path; }

class ConfigSchema {
 public:
  // Registers a key bound to a RunConfig field; its default is the field's value
  // in RunConfig{}. Chain constraints on the result (valid until the next add).
  template <typename T>
  ConfigKey& add(std::string name, T& (*field)(RunConfig&), std::string doc);

  // Cross-field check: returns "" when the config is fine, else the problem,
  // naming the keys and their values.
  using Check = std::function<std::string(const RunConfig&)>;
  void add_check(Check check) { checks_.push_back(std::move(check)); }

  const ConfigKey* find(const std::string& name) const;  // nullptr when unknown
  const ConfigKey& key(const std::string& name) const;   // throws when unknown
  ConfigKey& key(const std::string& name);
  // True for a proper prefix of some key: "model", "model.S".
  bool is_section(const std::string& name) const { return sections_.count(name) > 0; }
  const std::deque<ConfigKey>& keys() const { return keys_; }
  std::vector<std::string> top_sections() const;  // in registration order
  // The closest key or section to a misspelt name ("" when none is close).
  std::string suggest(const std::string& unknown) const;
  // Every problem of `config`: per-key violations, then cross-field checks.
  std::vector<std::string> problems(const RunConfig& config) const;

 private:
  ConfigKey& add_key(std::string name, KeyType type, ConfigValue default_value,
                     std::function<ConfigValue(const RunConfig&)> get,
                     std::function<void(RunConfig&, const ConfigValue&)> set, std::string doc);

  std::deque<ConfigKey> keys_;  // deque: references stay valid as keys are added
  std::map<std::string, size_t> index_;
  std::set<std::string> sections_;
  std::vector<Check> checks_;
};

template <typename T>
ConfigKey& ConfigSchema::add(std::string name, T& (*field)(RunConfig&), std::string doc) {
  KeyType type;
  if constexpr (std::is_same_v<T, int64_t>)
    type = KeyType::integer;
  else if constexpr (std::is_same_v<T, double>)
    type = KeyType::real;
  else if constexpr (std::is_same_v<T, bool>)
    type = KeyType::boolean;
  else if constexpr (std::is_same_v<T, std::string>)
    type = KeyType::string;
  else if constexpr (std::is_same_v<T, std::vector<std::string>>)
    type = KeyType::string_list;
  else
    static_assert(!sizeof(T), "config fields are int64_t, double, bool, std::string or std::vector<std::string>");
  RunConfig defaults;
  // get_ only reads through the accessor, so the const_cast never writes.
  return add_key(
      std::move(name), type, ConfigValue(field(defaults)),
      [field](const RunConfig& c) { return ConfigValue(field(const_cast<RunConfig&>(c))); },
      [field](RunConfig& c, const ConfigValue& v) { field(c) = std::get<T>(v); }, std::move(doc));
}

// The built-in keys and cross-field checks (built once, immutable).
const ConfigSchema& config_schema();
// Registers the built-in keys and checks into `schema` (config.cpp).
void register_run_keys(ConfigSchema& schema);

// ---------------------------------------------------------------------------
// Loading and writing. Errors throw loom::Error naming the key, the value, what
// is allowed and where it came from ("recipe.yaml:12" or the override).

// Defaults, then the recipe (none when `recipe_path` is ""), then `overrides`
// ("section.key=value", value in YAML syntax; later ones win), then derived
// defaults (log.name), then validation.
RunConfig load_config(const std::string& recipe_path, const std::vector<std::string>& overrides = {},
                      const ConfigSchema& schema = config_schema());
// The same from recipe text; `source_name` names it in errors, and its stem
// becomes log.name when it ends in .yaml / .yml (else log.name defaults to "default").
RunConfig load_config_from_string(const std::string& yaml, const std::string& source_name,
                                  const std::vector<std::string>& overrides = {},
                                  const ConfigSchema& schema = config_schema());
// Throws listing every problem (per-key constraints and cross-field checks).
void validate_config(const RunConfig& config, const ConfigSchema& schema = config_schema());

// Aligned table, one row per key: key, value, doc; '*' marks non-default values.
std::string config_table(const RunConfig& config, const ConfigSchema& schema = config_schema());
// Every key with its type and constraints, default and doc (for --help).
std::string config_reference(const ConfigSchema& schema = config_schema());
// The full config as a YAML recipe (every key, doc as comment); loading it gives `config` back.
std::string to_yaml(const RunConfig& config, const ConfigSchema& schema = config_schema());
// Writes to_yaml(config) to `path` atomically (temp file + rename), creating directories.
void write_resolved(const RunConfig& config, const std::string& path, const ConfigSchema& schema = config_schema());

}  // namespace loom
