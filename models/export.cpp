// Name mapping for export (see export.h). Internal names follow the module
// tree (blocks.{i}.mixer.q_proj.weight); exported names follow Llama.
#include "models/export.h"

#include <regex>

namespace loom {

std::string export_name(const std::string& name) {
  if (name == "embed.weight") return "model.embed_tokens.weight";
  if (name == "norm.weight") return "model.norm.weight";
  if (name == "lm_head.weight") return "lm_head.weight";
  static const std::regex block(R"(blocks\.(\d+)\.(.+))");
  std::smatch m;
  LOOM_CHECK(std::regex_match(name, m, block)) << "export: no exported name for parameter '" << name << "'";
  std::string prefix = "model.layers." + m[1].str() + ".", rest = m[2].str();
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"mixer_norm.weight", "input_layernorm.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"mixer.q_proj.weight", "self_attn.q_proj.weight"},
      {"mixer.k_proj.weight", "self_attn.k_proj.weight"},
      {"mixer.v_proj.weight", "self_attn.v_proj.weight"},
      {"mixer.o_proj.weight", "self_attn.o_proj.weight"},
      {"ffn.gate_proj.weight", "mlp.gate_proj.weight"},
      {"ffn.up_proj.weight", "mlp.up_proj.weight"},
      {"ffn.down_proj.weight", "mlp.down_proj.weight"},
  };
  for (const auto& [from, to] : table)
    if (rest == from) return prefix + to;
  // loom-specific layer parameters keep their module path under the layer.
  return prefix + "loom." + rest;
}

std::vector<std::pair<std::string, Tensor>> export_tensors(const DecoderLM& model) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& p : model.named_parameters()) out.emplace_back(export_name(p.name), p.var.data());
  return out;
}

nlohmann::json export_config(const DecoderConfig& c, DType torch_dtype) {
  // Llama-compatible: softmax layers without loom-specific options, dense FFN.
  bool softmax_only = c.layers.find_first_not_of('S') == std::string::npos && c.softmax.gate == "none" &&
                      c.softmax.heads == "dense" && c.softmax.sparsity == "dense" && c.ffn == "dense";
  nlohmann::json j;
  j["architectures"] = {softmax_only ? "LlamaForCausalLM" : "LoomForCausalLM"};
  j["model_type"] = softmax_only ? "llama" : "loom";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.d_model;
  j["intermediate_size"] = c.ffn_hidden;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["max_position_embeddings"] = c.max_seq_len;
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["torch_dtype"] = torch_dtype == DType::bf16 ? "bfloat16" : "float32";
  j["bos_token_id"] = nullptr;
  j["eos_token_id"] = c.vocab_size - 1;  // byte tokenizer: end-of-document id
  j["loom_layers"] = c.layers;          // loom's layer pattern (all 'S' for Llama-compatible models)
  return j;
}

}  // namespace loom
