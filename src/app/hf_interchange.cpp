// `mixdiff import-hf` and `mixdiff export-hf`: Hugging Face model folders <-> MixDiff checkpoints.
//
// Families whose math the backbone covers (pre-norm RMSNorm blocks, rotary attention with grouped
// KV heads, an optional q/k/v bias, optional QK-norm per head or over the projection, SwiGLU,
// token-choice MoE of SwiGLU experts with optional gated shared experts):
//   llama (LlamaForCausalLM), qwen2 (Qwen2ForCausalLM: q/k/v bias), qwen3 (Qwen3ForCausalLM: QK-norm
//   per head), mixtral (MixtralForCausalLM), qwen2_moe (Qwen2MoeForCausalLM: q/k/v bias, a shared
//   expert behind a sigmoid gate), qwen3_moe (Qwen3MoeForCausalLM), olmoe (OlmoeForCausalLM:
//   QK-norm over the whole projection), and mixdiff (the folders export-hf writes for diffusion
//   models).
// Tensor names (HF -> MixDiff): model.embed_tokens -> embed (plus the [MASK] row, the mean of the
// rows: a neutral start for adaptation), lm_head -> head (absent when tied), input_layernorm ->
// attn_norm, post_attention_layernorm -> ffn_norm, q/k/v_proj -> the rows [q; k; v] of
// attn.wqkv (their biases: attn.bqkv), o_proj -> attn.wo, q_norm/k_norm -> attn.q_norm/k_norm,
// mlp.{gate,up,down}_proj -> ffn.w_gate/w_up/w_down, router gate -> ffn.router.weight, expert
// e's gate/up/down (Mixtral's w1/w3/w2) -> row e of ffn.experts.w_gate/w_up/w_down,
// shared_expert -> ffn.shared, shared_expert_gate -> ffn.shared_gate, model.norm -> norm. Both use rotate_half
// rotary, so no permutation. What a family needs that MixDiff lacks is refused naming the field
// (config keys an importer does not know are refused too: nothing is approximated silently).
#include <torch/torch.h>

#include <filesystem>
#include <iostream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "app/app.h"
#include "app/hf_files.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/fs.h"
#include "core/json_util.h"
#include "core/safetensors.h"
#include "data/tokenizer.h"
#include "model/model.h"
#include "model/transformer.h"
#include "train/checkpoint.h"

namespace mixdiff {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

enum class QkNorm { kNone, kHead, kProjection };

struct Family {
  const char* type;
  const char* architecture;
  bool moe;
  QkNorm qk;
  bool bias;               ///< q/k/v biases
  bool shared;             ///< one shared expert behind a sigmoid gate (Qwen2-MoE)
  const char* moe_prefix;  ///< module of the MoE block under model.layers.i
  const char* gate;        ///< expert projection names
  const char* up;
  const char* down;
};

const Family kFamilies[] = {
    {"llama", "LlamaForCausalLM", false, QkNorm::kNone, false, false, "mlp", "gate_proj", "up_proj", "down_proj"},
    {"qwen2", "Qwen2ForCausalLM", false, QkNorm::kNone, true, false, "mlp", "gate_proj", "up_proj", "down_proj"},
    {"qwen3", "Qwen3ForCausalLM", false, QkNorm::kHead, false, false, "mlp", "gate_proj", "up_proj", "down_proj"},
    {"mixtral", "MixtralForCausalLM", true, QkNorm::kNone, false, false, "block_sparse_moe", "w1", "w3", "w2"},
    {"qwen2_moe", "Qwen2MoeForCausalLM", true, QkNorm::kNone, true, true, "mlp", "gate_proj", "up_proj", "down_proj"},
    {"qwen3_moe", "Qwen3MoeForCausalLM", true, QkNorm::kHead, false, false, "mlp", "gate_proj", "up_proj", "down_proj"},
    {"olmoe", "OlmoeForCausalLM", true, QkNorm::kProjection, false, false, "mlp", "gate_proj", "up_proj", "down_proj"},
};

/// Families whose math MixDiff lacks, with the field that says so.
const std::pair<const char*, const char*> kRefused[] = {
    {"deepseek_v3", "kv_lora_rank: multi-head latent attention (MLA) is not in MixDiff's backbone"},
    {"deepseek_v2", "kv_lora_rank: multi-head latent attention (MLA) is not in MixDiff's backbone"},
};

/// config.json, checked key by key.
class HfConfig {
 public:
  HfConfig(std::string dir) : path_(dir + "/config.json"), j_(read_json_file(path_, "model config")) {
    if (!j_.is_object()) throw InputError(str(path_, ": expected a JSON object"));
  }
  [[noreturn]] void refuse(const std::string& key, const std::string& why) const {
    throw InputError(str(path_, ": ", key, ": ", why));
  }
  bool has(const std::string& k) const { return j_.contains(k) && !j_[k].is_null(); }
  template <typename T>
  T get(const std::string& k) {
    seen_.insert(k);
    if (!has(k)) refuse(k, "missing");
    try {
      return j_[k].get<T>();
    } catch (const json::exception&) {
      refuse(k, str("unexpected value ", j_[k].dump()));
    }
  }
  template <typename T>
  T get(const std::string& k, const T& def) {
    seen_.insert(k);
    return has(k) ? get<T>(k) : def;
  }
  void expect_false(const std::string& k, const std::string& why) {
    if (get<bool>(k, false)) refuse(k, why);
  }
  void expect_null(const std::string& k, const std::string& why) {
    seen_.insert(k);
    if (has(k)) refuse(k, str(j_[k].dump(), ": ", why));
  }
  void ignore(std::initializer_list<const char*> keys) {
    for (const char* k : keys) seen_.insert(k);
  }
  /// Every key not read or ignored is refused.
  void check_all_read(const std::string& family) const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (!seen_.count(it.key())) {
        refuse(it.key(), str("not understood by the ", family,
                             " importer (refused rather than ignored; MixDiff reproduces only "
                             "what it knows)"));
      }
    }
  }
  const json& raw() const { return j_; }

 private:
  std::string path_;
  json j_;
  std::set<std::string> seen_;
};

/// All tensors of a folder: model.safetensors, or the shards its index names.
TensorMap load_hf_tensors(const std::string& dir) {
  if (fs::exists(dir + "/model.safetensors")) return load_safetensors(dir + "/model.safetensors");
  const std::string index = dir + "/model.safetensors.index.json";
  if (!fs::exists(index)) {
    throw InputError(str(dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  json idx = read_json_file(index, "safetensors index");
  if (!idx.contains("weight_map") || !idx["weight_map"].is_object()) {
    throw InputError(str(index, ": weight_map: expected an object"));
  }
  std::set<std::string> shards;
  for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
    shards.insert(it.value().get<std::string>());
  }
  TensorMap all;
  for (const auto& s : shards) {
    for (auto& kv : load_safetensors(dir + "/" + s)) all.emplace(kv.first, kv.second);
  }
  for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
    if (!all.count(it.key())) {
      throw InputError(str(index, ": tensor '", it.key(), "' is not in ", it.value().get<std::string>()));
    }
  }
  return all;
}

/// JSON of a recipe node (scalars typed: bool, integer, number, else string).
json node_json(const ConfigNode& n) {
  if (n.is_map()) {
    json o = json::object();
    for (const auto& k : n.keys()) o[k] = node_json(n.at(k));
    return o;
  }
  if (n.is_sequence()) {
    json a = json::array();
    for (size_t i = 0; i < n.size(); ++i) a.push_back(node_json(n[i]));
    return a;
  }
  if (n.is_null()) return nullptr;
  const std::string s = n.as<std::string>();
  if (s == "true" || s == "True" || s == "false" || s == "False") {  // as Convert<bool> reads
    return s == "true" || s == "True";
  }
  try {
    size_t pos = 0;
    const long long v = std::stoll(s, &pos);
    if (pos == s.size()) return v;
  } catch (...) {
  }
  try {
    size_t pos = 0;
    const double v = std::stod(s, &pos);
    if (pos == s.size()) return v;
  } catch (...) {
  }
  return s;
}

std::string adaptation_recipe(const std::string& name, const json& model, bool moe,
                              const std::string& tokenizer_dir, int64_t seq_len,
                              const std::string& init) {
  std::ostringstream y;
  y << "# Diffusion adaptation of an imported checkpoint (written by mixdiff import-hf):\n"
    << "#   mixdiff data prepare THIS.yaml && mixdiff train THIS.yaml\n"
    << "name: " << name << "\nseed: 0\nruntime: {threads: 1}\n"
    << "model: " << model.dump() << "\n"  // JSON is YAML
    << "diffusion:\n  schedule: {kind: linear, eps: 0.001, t_sampling: stratified, t_min: 0.1}\n"
    << "losses:\n  - {kind: masked_diffusion_elbo, weight: 1.0}\n";
  if (moe) y << "  - {kind: load_balance, scope: global, weight: 0.01}\n";
  y << "data:\n  kind: token_shards\n  path: datasets/" << name << "\n  seq_len: " << seq_len
    << "\n  prepare:\n    corpora: [{kind: kjv}, {kind: fortunes}, {kind: wordnet}]\n"
    << "    tokenizer: {kind: folder, dir: " << json(tokenizer_dir).dump() << "}\n"
    << "    val_fraction: 0.01\n"
    << "optim: {kind: adamw, lr: 0.0003, betas: [0.9, 0.95], weight_decay: 0.1}\n"
    << "lr_schedule: {kind: warmup_cosine, warmup_steps: 50, min_lr_ratio: 0.1}\n"
    << "train: {steps: 500, batch_size: 16, log_every: 50, ckpt_every: 250}\n"
    << "eval: {every: 250, sequences: 256, batch_size: 32}\n"
    << "generate:\n  prompt: \"And God said\"\n"
    << "  sampler: {kind: llada, gen_length: 64, steps: 64, block_length: 4, temperature: 0.7}\n";
  if (!init.empty()) y << "init: {checkpoint: " << json(init).dump() << "}\n";
  return y.str();
}

at::Tensor take(TensorMap& t, const std::string& name, const std::string& dir) {
  auto it = t.find(name);
  if (it == t.end()) throw InputError(str(dir, ": tensor '", name, "' is missing"));
  at::Tensor v = it->second.to(torch::kFloat32).contiguous();
  t.erase(it);
  return v;
}

}  // namespace

namespace {
int import_hf(const ImportHfArgs& a) {
  torch::NoGradGuard ng;
  if (a.out.empty()) throw InputError("import-hf: --out RUN is required");
  if (!a.attention.empty() && a.attention != "full" && a.attention != "causal") {
    throw InputError(str("import-hf: --attention: expected full or causal, got '", a.attention, "'"));
  }
  if (fs::exists(a.out + "/checkpoints")) {
    throw InputError(str("import-hf: '", a.out, "' already holds checkpoints; choose another --out"));
  }
  HfConfig cfg(a.dir);
  const std::string type = cfg.get<std::string>("model_type");
  for (const auto& r : kRefused) {
    if (type == r.first) cfg.refuse("model_type", str(type, ": ", r.second));
  }
  const bool native = type == "mixdiff";
  const Family* fam = nullptr;
  for (const auto& f : kFamilies) {
    if (type == f.type) fam = &f;
  }
  if (!fam && !native) {
    cfg.refuse("model_type", str("'", type, "' is not supported (llama, qwen2, qwen3, mixtral, "
                                 "qwen2_moe, qwen3_moe, olmoe, mixdiff)"));
  }
  TensorMap hf = load_hf_tensors(a.dir);
  // An export-hf folder counts [MASK] in vocab_size (the embedding's rows, as transformers reads
  // it); its model section has the tokenizer's size.
  const int64_t V = native ? cfg.get<json>("mixdiff_model").value("vocab_size", int64_t(0))
                           : cfg.get<int64_t>("vocab_size");
  std::vector<std::string> notes;

  json model;   // the recipe's model section
  TensorMap mt;  // MixDiff tensors by name
  const std::string attention = a.attention.empty() ? "full" : a.attention;
  if (native) {
    // A folder of export-hf: the recipe's model section is in the config, tensors by name.
    cfg.ignore({"architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
                "mask_token_id", "vocab_size", "eos_token_id", "bos_token_id", "pad_token_id",
                "tie_word_embeddings", "layer_pattern"});
    model = cfg.get<json>("mixdiff_model");
    if (!model.is_object()) cfg.refuse("mixdiff_model", "expected the recipe's model section");
    // The keys modeling_mixdiff.py reads must say what the model section says: an edited
    // config.json is refused rather than imported as something else.
    for (const char* k : {"d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff",
                          "max_seq_len", "rope_theta", "qk_norm", "qkv_bias", "tie_embeddings",
                          "attention", "block_size", "norm_eps", "moe"}) {
      const json v = cfg.get<json>(k, json());
      if (std::string(k) == "moe" || v.is_null() || !model.contains(k)) continue;
      if (v != model[k]) {
        cfg.refuse(k, str(v.dump(), " differs from mixdiff_model.", k, " ", model[k].dump()));
      }
    }
    cfg.check_all_read("mixdiff");
    if (!a.attention.empty()) model["attention"] = a.attention;
    mt = std::move(hf);
  } else {
    cfg.ignore({"architectures", "transformers_version", "dtype", "torch_dtype", "initializer_range",
                "use_cache", "bos_token_id", "pad_token_id", "eos_token_id", "attention_dropout",
                "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
                "router_z_loss_coef", "_name_or_path", "pretraining_tp", "max_window_layers",
                "hidden_dropout", "keys_to_ignore_at_inference"});
    const std::string act = cfg.get<std::string>("hidden_act", std::string("silu"));
    if (act != "silu" && act != "swish") cfg.refuse("hidden_act", str("'", act, "': MixDiff's FFN is SwiGLU (silu)"));
    bool bias = fam->bias;
    if (std::string(fam->type) == "qwen2_moe") {
      bias = cfg.get<bool>("qkv_bias", true);
    } else if (!fam->bias) {
      cfg.expect_false("attention_bias", "attention biases: MixDiff has q/k/v biases (Qwen2) only");
    }
    if (std::string(fam->type) == "olmoe") {
      cfg.expect_null("clip_qkv", "clipping q/k/v is not in MixDiff's attention");
    }
    cfg.expect_false("mlp_bias", "MLP biases: MixDiff's SwiGLU has none");
    cfg.expect_null("rope_scaling", "rope scaling is not in MixDiff's rotary embedding");
    double theta = 10000.0;
    if (cfg.has("rope_parameters")) {
      const json rp = cfg.get<json>("rope_parameters");
      if (rp.contains("rope_type") && rp["rope_type"] != "default") {
        cfg.refuse("rope_parameters.rope_type", str(rp["rope_type"].dump(), ": only default rotary "
                                                                         "(no scaling) is supported"));
      }
      for (auto it = rp.begin(); it != rp.end(); ++it) {
        if (it.key() == "rope_type") {
        } else if (it.key() == "rope_theta") {
          theta = it.value().get<double>();
        } else {
          cfg.refuse("rope_parameters." + it.key(), "not supported (default rotary only)");
        }
      }
    } else {
      theta = cfg.get<double>("rope_theta", 10000.0);
    }
    // Sliding-window attention: Mixtral/Llama use it when sliding_window is set; Qwen when
    // use_sliding_window is true.
    const bool qwen = std::string(fam->type).rfind("qwen", 0) == 0;
    if (qwen) {
      cfg.expect_false("use_sliding_window", "sliding-window attention is not in MixDiff's backbone");
      cfg.get<json>("sliding_window", json());
    } else {
      cfg.expect_null("sliding_window", "sliding-window attention is not in MixDiff's backbone");
    }
    if (cfg.has("layer_types")) {
      for (const auto& t : cfg.get<json>("layer_types")) {
        if (t != "full_attention") cfg.refuse("layer_types", str(t.dump(), ": only full_attention layers"));
      }
    }
    const int64_t D = cfg.get<int64_t>("hidden_size"), NL = cfg.get<int64_t>("num_hidden_layers");
    const int64_t H = cfg.get<int64_t>("num_attention_heads");
    const int64_t Hk = cfg.get<int64_t>("num_key_value_heads", H);
    const int64_t hd = cfg.get<int64_t>("head_dim", D / H);
    const bool tied = cfg.get<bool>("tie_word_embeddings", false);
    model = {{"kind", fam->moe ? "moe_dlm" : "dense_dlm"},
             {"vocab_size", V},
             {"d_model", D},
             {"n_layer", NL},
             {"n_head", H},
             {"n_kv_head", Hk},
             {"head_dim", hd},
             {"d_ff", cfg.get<int64_t>("intermediate_size")},
             {"max_seq_len", cfg.get<int64_t>("max_position_embeddings")},
             {"rope_theta", theta},
             {"qk_norm", fam->qk == QkNorm::kNone ? json(false)
                         : fam->qk == QkNorm::kHead ? json(true) : json("projection")},
             {"qkv_bias", bias},
             {"tie_embeddings", tied},
             {"norm_eps", cfg.get<double>("rms_norm_eps")},
             {"attention", attention}};
    std::string pattern(static_cast<size_t>(NL), 'D');
    if (fam->moe) {
      const int64_t E = cfg.has("num_local_experts") ? cfg.get<int64_t>("num_local_experts")
                                                     : cfg.get<int64_t>("num_experts");
      cfg.ignore({"num_experts", "num_local_experts"});
      const int64_t K = cfg.get<int64_t>("num_experts_per_tok");
      int64_t F = 0;
      bool normalize = true;
      if (std::string(fam->type) == "mixtral" || std::string(fam->type) == "olmoe") {
        F = cfg.get<int64_t>("intermediate_size");
        pattern.assign(static_cast<size_t>(NL), 'M');
        if (std::string(fam->type) == "olmoe") normalize = cfg.get<bool>("norm_topk_prob", false);
      } else {
        F = cfg.get<int64_t>("moe_intermediate_size");
        normalize = cfg.get<bool>("norm_topk_prob", false);
        const int64_t step = cfg.get<int64_t>("decoder_sparse_step", 1);
        std::set<int64_t> dense_only;
        for (const auto& i : cfg.get<json>("mlp_only_layers", json::array())) dense_only.insert(i.get<int64_t>());
        for (int64_t i = 0; i < NL; ++i) {
          if (!dense_only.count(i) && E > 0 && step > 0 && (i + 1) % step == 0) pattern[static_cast<size_t>(i)] = 'M';
        }
      }
      model["moe"] = {{"n_expert", E},
                      {"d_expert", F},
                      {"layer_pattern", pattern},
                      {"router", {{"kind", "token_choice"}, {"top_k", K}, {"score", "softmax"},
                                  {"normalize", normalize}}}};
      if (fam->shared) {
        model["moe"]["n_shared"] = 1;
        model["moe"]["d_shared"] = cfg.get<int64_t>("shared_expert_intermediate_size");
        model["moe"]["shared_gate"] = true;
      }
      if (pattern.find('M') == std::string::npos) cfg.refuse("mlp_only_layers", "no MoE layer is left");
    }
    cfg.check_all_read(fam->type);

    // Tensors.
    at::Tensor emb = take(hf, "model.embed_tokens.weight", a.dir);
    if (emb.size(0) != V) throw InputError(str(a.dir, ": model.embed_tokens.weight has ", emb.size(0), " rows, vocab_size is ", V));
    mt["embed"] = torch::cat({emb, emb.mean(0, true)}, 0);
    if (!tied) mt["head"] = take(hf, "lm_head.weight", a.dir);
    else hf.erase("lm_head.weight");  // some tied checkpoints store it anyway
    mt["norm.weight"] = take(hf, "model.norm.weight", a.dir);
    for (int64_t i = 0; i < NL; ++i) {
      const std::string p = str("model.layers.", i, "."), q = str("layers.", i, ".");
      mt[q + "attn_norm.weight"] = take(hf, p + "input_layernorm.weight", a.dir);
      mt[q + "ffn_norm.weight"] = take(hf, p + "post_attention_layernorm.weight", a.dir);
      mt[q + "attn.wqkv"] = torch::cat({take(hf, p + "self_attn.q_proj.weight", a.dir),
                                        take(hf, p + "self_attn.k_proj.weight", a.dir),
                                        take(hf, p + "self_attn.v_proj.weight", a.dir)}, 0);
      mt[q + "attn.wo"] = take(hf, p + "self_attn.o_proj.weight", a.dir);
      if (bias) {
        mt[q + "attn.bqkv"] = torch::cat({take(hf, p + "self_attn.q_proj.bias", a.dir),
                                          take(hf, p + "self_attn.k_proj.bias", a.dir),
                                          take(hf, p + "self_attn.v_proj.bias", a.dir)}, 0);
      }
      if (fam->qk != QkNorm::kNone) {
        mt[q + "attn.q_norm.weight"] = take(hf, p + "self_attn.q_norm.weight", a.dir);
        mt[q + "attn.k_norm.weight"] = take(hf, p + "self_attn.k_norm.weight", a.dir);
      }
      if (pattern[static_cast<size_t>(i)] == 'D') {
        mt[q + "ffn.w_gate"] = take(hf, p + "mlp.gate_proj.weight", a.dir);
        mt[q + "ffn.w_up"] = take(hf, p + "mlp.up_proj.weight", a.dir);
        mt[q + "ffn.w_down"] = take(hf, p + "mlp.down_proj.weight", a.dir);
      } else {
        const std::string m = p + fam->moe_prefix + ".";
        mt[q + "ffn.router.weight"] = take(hf, m + "gate.weight", a.dir);
        const int64_t E = model["moe"]["n_expert"].get<int64_t>();
        std::vector<at::Tensor> g, u, d;
        for (int64_t e = 0; e < E; ++e) {
          const std::string x = str(m, "experts.", e, ".");
          g.push_back(take(hf, x + fam->gate + ".weight", a.dir));
          u.push_back(take(hf, x + fam->up + ".weight", a.dir));
          d.push_back(take(hf, x + fam->down + ".weight", a.dir));
        }
        mt[q + "ffn.experts.w_gate"] = torch::stack(g);
        mt[q + "ffn.experts.w_up"] = torch::stack(u);
        mt[q + "ffn.experts.w_down"] = torch::stack(d);
        if (fam->shared) {
          mt[q + "ffn.shared.w_gate"] = take(hf, m + "shared_expert.gate_proj.weight", a.dir);
          mt[q + "ffn.shared.w_up"] = take(hf, m + "shared_expert.up_proj.weight", a.dir);
          mt[q + "ffn.shared.w_down"] = take(hf, m + "shared_expert.down_proj.weight", a.dir);
          mt[q + "ffn.shared_gate"] = take(hf, m + "shared_expert_gate.weight", a.dir);
        }
      }
    }
    for (auto it = hf.begin(); it != hf.end();) {  // stale rotary tables of old checkpoints
      it = it->first.find("rotary_emb.inv_freq") != std::string::npos ? hf.erase(it) : std::next(it);
    }
    if (!hf.empty()) {
      throw InputError(str(a.dir, ": tensor '", hf.begin()->first, "' has no place in a ", type,
                           " model as MixDiff reads it (", hf.size(), " left over)"));
    }
    notes.push_back("the [MASK] embedding row is new: the mean of the imported rows");
  }

  // The model, to check every tensor's name and shape.
  std::string abs_out = fs::absolute(a.out).lexically_normal().string();
  while (abs_out.size() > 1 && abs_out.back() == '/') abs_out.pop_back();  // --out runs/mine/
  const std::string name = fs::path(abs_out).filename().string();
  const std::string tok_dir = abs_out + "/tokenizer";
  const int64_t max_len = model.value("max_seq_len", int64_t(128));
  const std::string ckpt_recipe =
      adaptation_recipe(name, model, model.value("kind", "") != "dense_dlm", tok_dir,
                        std::min<int64_t>(128, max_len), "");
  ConfigNode recipe = ConfigNode::from_string(ckpt_recipe, a.out + "/recipe.yaml");
  std::shared_ptr<ModelBase> net = build_model(recipe.at("model"));
  for (auto& kv : model_state(*net)) {
    auto it = mt.find(kv.first);
    if (it == mt.end()) {
      // Fresh state: expert-usage statistics (export-hf drops them), and the selection bias that
      // no Hugging Face family has.
      if ((native && kv.first.find(".usage_") != std::string::npos) ||
          (!native && kv.first.find(".balancer.") != std::string::npos)) {
        continue;
      }
      throw InputError(str(a.dir, ": MixDiff's tensor '", kv.first, "' has no source"));
    }
    if (it->second.sizes() != kv.second.sizes()) {
      throw InputError(str(a.dir, ": tensor for '", kv.first, "' has shape ", it->second.sizes(),
                           ", the model expects ", kv.second.sizes()));
    }
    kv.second.copy_(it->second);
    mt.erase(it);
  }
  if (!mt.empty()) {
    throw InputError(str(a.dir, ": tensor '", mt.begin()->first, "' has no place in the model"));
  }

  // Tokenizer; the end-of-text token is config.json's eos_token_id when it has one.
  int64_t eos_id = -1;
  if (cfg.raw().contains("eos_token_id")) {
    json e = cfg.raw()["eos_token_id"];
    if (e.is_array()) e = e.empty() ? json() : e[0];
    if (e.is_number_integer()) eos_id = e.get<int64_t>();
  }
  std::unique_ptr<Tokenizer> tok;
  if (fs::exists(a.dir + "/tokenizer.json")) {
    tok = std::make_unique<Tokenizer>(
        read_hf_tokenizer(a.dir + "/tokenizer.json", "", V, &notes, eos_id));
  } else if (fs::exists(a.dir + "/vocab.json") && fs::exists(a.dir + "/merges.txt")) {
    std::string eos_token = "<|endoftext|>";
    if (eos_id >= 0) {
      json vj = read_json_file(a.dir + "/vocab.json", "tokenizer vocabulary");
      for (auto it = vj.begin(); it != vj.end(); ++it) {
        if (it.value() == eos_id) eos_token = it.key();
      }
    }
    tok = std::make_unique<Tokenizer>(
        "gpt2", ByteLevelBpe::from_files(a.dir + "/vocab.json", a.dir + "/merges.txt", eos_token));
  } else {
    throw InputError(str(a.dir, ": no tokenizer.json (or GPT-2 style vocab.json + merges.txt)"));
  }
  if (tok->vocab_size() != V) {
    throw InputError(str(a.dir, ": the tokenizer has ", tok->vocab_size(), " tokens, vocab_size is ", V));
  }
  fs::create_directories(a.out);
  tok->save(tok_dir);

  CheckpointContent c;
  c.model = net.get();
  c.recipe_yaml = ckpt_recipe;
  c.tokenizer_dir = tok_dir;
  c.trainer_state = {{"tokens", 0},
                     {"data_cursor", 0},
                     {"seed", 0},
                     {"elapsed_s", 0.0},
                     {"last_val_nelbo", -1.0},
                     {"world_size", 1},
                     {"replicas_identical", true},
                     {"provenance", {{"method", "import-hf"},
                                     {"source", fs::absolute(a.dir).string()},
                                     {"model_type", type},
                                     {"notes", notes}}}};
  const std::string dir = save_checkpoint(a.out, 0, c, 0);
  if (!a.recipe_out.empty()) {  // diffusion adaptation: bidirectional whatever was imported
    json adapted = model;
    adapted["attention"] = "full";
    write_file_atomic(a.recipe_out,
                      adaptation_recipe(name, adapted, model.value("kind", "") != "dense_dlm",
                                        tok_dir, std::min<int64_t>(128, max_len), abs_out));
  }
  std::cout << "import-hf: " << type << " -> " << net->describe() << "\n  "
            << net->num_parameters() << " parameters; attention " << model.value("attention", "full")
            << "\n  wrote " << dir;
  for (const auto& n : notes) std::cout << "\n  note: " << n;
  if (!a.recipe_out.empty()) {
    std::cout << "\n  adaptation recipe: " << a.recipe_out << " (mixdiff data prepare "
              << a.recipe_out << " && mixdiff train " << a.recipe_out << ")";
  }
  std::cout << std::endl;
  return 0;
}

}  // namespace

int cmd_import_hf(const ImportHfArgs& a) {
  // A config value of the wrong JSON type, or tensors whose shapes do not fit together, is bad
  // input: one line naming the folder.
  try {
    return import_hf(a);
  } catch (const json::exception& e) {
    throw InputError(str(a.dir, "/config.json: unexpected value: ", e.what()));
  } catch (const c10::Error& e) {
    throw InputError(str(a.dir, ": tensors do not fit the configuration: ", e.what_without_backtrace()));
  }
}

int cmd_export_hf(const ExportHfArgs& a) {
  torch::NoGradGuard ng;
  if (a.out.empty()) throw InputError("export-hf: --out DIR is required");
  if (a.as != "auto" && a.as != "causal" && a.as != "mixdiff") {
    throw InputError(str("export-hf: --as: expected auto, causal or mixdiff, got '", a.as, "'"));
  }
  const std::string ckpt = resolve_checkpoint(a.ckpt);
  verify_checkpoint(ckpt);
  ConfigNode recipe = ConfigNode::from_file(ckpt + "/recipe.yaml");
  ConfigNode mc = recipe.at("model");
  std::shared_ptr<ModelBase> net = build_model(mc);
  load_model_weights(*net, ckpt + "/model.safetensors");
  Tokenizer tok = Tokenizer::load(ckpt + "/tokenizer");
  const std::string kind = mc.get<std::string>("kind");
  const auto* tr = dynamic_cast<const TransformerDlm*>(net.get());
  if (!tr || (kind != "dense_dlm" && kind != "moe_dlm")) {
    mc.fail("kind", str("'", kind, "' has no transformers implementation (dense_dlm and moe_dlm have)"));
  }
  const TransformerOptions& o = tr->options();
  TensorMap state;
  for (auto& kv : model_state(*net)) state[kv.first] = kv.second.contiguous();
  std::string pattern(static_cast<size_t>(o.n_layer), 'D');
  json moe;
  if (kind == "moe_dlm") {
    ConfigNode m = mc.at("moe");
    pattern = read_block_pattern(m, o.n_layer);
    moe = node_json(m);
    ConfigNode r = m.at("router");
    if (r.get<std::string>("kind") != "token_choice") {
      r.fail("kind", "only token_choice routers have a transformers implementation");
    }
    if (r.has("balancer") && r.at("balancer").get<std::string>("kind", "none") != "none" &&
        r.at("balancer").get<std::string>("kind", "none") != "aux_free") {
      r.at("balancer").fail("kind", "only aux_free has a transformers implementation");
    }
    if (m.get<double>("capacity_factor", 0.0) > 0) m.fail("capacity_factor", "capacity drops are not exported");
    if (m.has("block_routing") &&
        BlockRoutingConfig::from(m.at("block_routing")).policy->restricts()) {
      m.at("block_routing").fail("kind", "restricted block routing has no transformers implementation");
    }
    moe["layer_pattern"] = pattern;
  }
  // Which architecture: a standard causal one when the model is causal and one exists for it.
  std::string why_not;
  const Family* fam = nullptr;
  const QkNorm qk = !o.qk_norm ? QkNorm::kNone : o.qk_norm_projection ? QkNorm::kProjection : QkNorm::kHead;
  const bool all_moe = pattern.find('D') == std::string::npos;
  if (o.attention != "causal") {
    why_not = str("model.attention is ", o.attention, " (a causal architecture needs causal)");
  } else if (kind == "dense_dlm") {
    for (const auto& f : kFamilies) {
      if (!f.moe && f.qk == qk && f.bias == o.qkv_bias) fam = &f;
    }
    if (!fam) why_not = "no transformers architecture has this attention (QK-norm and bias)";
  } else {
    ConfigNode m = mc.at("moe"), r = m.at("router");
    const bool softmax = r.get<std::string>("score", "softmax") == "softmax";
    const bool after = r.get<std::string>("softmax", "before_topk") == "after_topk";
    const bool normalize = after || r.get<bool>("normalize", !softmax);
    const int64_t n_shared = m.get<int64_t>("n_shared", 0);
    const bool gated_one = n_shared == 1 && m.get<bool>("shared_gate", false);
    if (!softmax || r.get<double>("scaling", 1.0) != 1.0 || r.get<int64_t>("n_group", 1) > 1 ||
        r.get<int64_t>("n_null", 0) > 0 ||
        (r.has("balancer") && r.at("balancer").get<std::string>("kind", "none") != "none") ||
        (n_shared > 0 && !gated_one)) {
      why_not = "the router or the shared experts go beyond softmax top-k (Mixtral, Qwen2-MoE, "
                "Qwen3-MoE, OLMoE)";
    } else {
      for (const auto& f : kFamilies) {
        if (!f.moe || f.qk != qk || f.bias != o.qkv_bias || f.shared != gated_one) continue;
        const std::string t = f.type;
        if (t == "mixtral" && !(normalize && all_moe)) continue;
        if (t == "olmoe" && !all_moe) continue;
        fam = &f;
      }
      moe["norm_topk_prob"] = normalize;
      if (!fam) {
        why_not = "no transformers MoE architecture has this attention, shared-expert and "
                  "dense-block layout";
      }
    }
  }
  if (a.as == "causal" && !fam) throw InputError(str(ckpt, ": --as causal: ", why_not));
  if (a.as == "mixdiff") fam = nullptr;
  fs::create_directories(a.out);
  const int64_t V = o.vocab_size;
  json config;
  TensorMap out;
  if (fam) {
    const std::string t = fam->type;
    const bool mixtral = t == "mixtral";
    config = {{"architectures", {fam->architecture}},
              {"model_type", fam->type},
              {"vocab_size", V},
              {"hidden_size", o.d_model},
              {"intermediate_size", o.d_ff},
              {"num_hidden_layers", o.n_layer},
              {"num_attention_heads", o.n_head},
              {"num_key_value_heads", o.n_kv_head},
              {"head_dim", o.head_dim},
              {"max_position_embeddings", o.max_seq_len},
              {"rms_norm_eps", o.norm_eps},
              {"rope_parameters", {{"rope_theta", o.rope_theta}, {"rope_type", "default"}}},
              {"tie_word_embeddings", o.tie_embeddings},
              {"hidden_act", "silu"},
              {"eos_token_id", tok.eos_id()},
              {"dtype", "float32"}};
    if (t == "llama" || t == "qwen3" || t == "qwen3_moe" || t == "olmoe") config["attention_bias"] = false;
    if (t == "qwen2_moe") config["qkv_bias"] = true;
    if (fam->moe) {
      ConfigNode m = mc.at("moe");
      config[mixtral ? "num_local_experts" : "num_experts"] = m.get<int64_t>("n_expert");
      config["num_experts_per_tok"] = m.at("router").get<int64_t>("top_k");
      if (mixtral || t == "olmoe") {
        config["intermediate_size"] = m.get<int64_t>("d_expert");
        if (t == "olmoe") config["norm_topk_prob"] = moe["norm_topk_prob"];
      } else {
        if (fam->shared) config["shared_expert_intermediate_size"] = m.get<int64_t>("d_shared");
        config["moe_intermediate_size"] = m.get<int64_t>("d_expert");
        config["norm_topk_prob"] = moe["norm_topk_prob"];
        config["decoder_sparse_step"] = 1;
        json dense = json::array();
        for (int64_t i = 0; i < o.n_layer; ++i) {
          if (pattern[static_cast<size_t>(i)] == 'D') dense.push_back(i);
        }
        config["mlp_only_layers"] = dense;
      }
    }
    out["model.embed_tokens.weight"] = state.at("embed").narrow(0, 0, V).contiguous();
    if (!o.tie_embeddings) out["lm_head.weight"] = state.at("head");
    out["model.norm.weight"] = state.at("norm.weight");
    const int64_t qn = o.n_head * o.head_dim, kn = o.n_kv_head * o.head_dim;
    for (int64_t i = 0; i < o.n_layer; ++i) {
      const std::string p = str("model.layers.", i, "."), q = str("layers.", i, ".");
      out[p + "input_layernorm.weight"] = state.at(q + "attn_norm.weight");
      out[p + "post_attention_layernorm.weight"] = state.at(q + "ffn_norm.weight");
      const at::Tensor& w = state.at(q + "attn.wqkv");
      out[p + "self_attn.q_proj.weight"] = w.narrow(0, 0, qn).contiguous();
      out[p + "self_attn.k_proj.weight"] = w.narrow(0, qn, kn).contiguous();
      out[p + "self_attn.v_proj.weight"] = w.narrow(0, qn + kn, kn).contiguous();
      out[p + "self_attn.o_proj.weight"] = state.at(q + "attn.wo");
      if (o.qkv_bias) {
        const at::Tensor& b = state.at(q + "attn.bqkv");
        out[p + "self_attn.q_proj.bias"] = b.narrow(0, 0, qn).contiguous();
        out[p + "self_attn.k_proj.bias"] = b.narrow(0, qn, kn).contiguous();
        out[p + "self_attn.v_proj.bias"] = b.narrow(0, qn + kn, kn).contiguous();
      }
      if (o.qk_norm) {
        out[p + "self_attn.q_norm.weight"] = state.at(q + "attn.q_norm.weight");
        out[p + "self_attn.k_norm.weight"] = state.at(q + "attn.k_norm.weight");
      }
      if (pattern[static_cast<size_t>(i)] == 'D') {
        out[p + "mlp.gate_proj.weight"] = state.at(q + "ffn.w_gate");
        out[p + "mlp.up_proj.weight"] = state.at(q + "ffn.w_up");
        out[p + "mlp.down_proj.weight"] = state.at(q + "ffn.w_down");
      } else {
        const std::string m = p + fam->moe_prefix + ".";
        out[m + "gate.weight"] = state.at(q + "ffn.router.weight");
        const at::Tensor &g = state.at(q + "ffn.experts.w_gate"), &u = state.at(q + "ffn.experts.w_up"),
                         &d = state.at(q + "ffn.experts.w_down");
        for (int64_t e = 0; e < g.size(0); ++e) {
          const std::string x = str(m, "experts.", e, ".");
          out[x + fam->gate + ".weight"] = g[e].contiguous();
          out[x + fam->up + ".weight"] = u[e].contiguous();
          out[x + fam->down + ".weight"] = d[e].contiguous();
        }
        if (fam->shared) {
          out[m + "shared_expert.gate_proj.weight"] = state.at(q + "ffn.shared.w_gate");
          out[m + "shared_expert.up_proj.weight"] = state.at(q + "ffn.shared.w_up");
          out[m + "shared_expert.down_proj.weight"] = state.at(q + "ffn.shared.w_down");
          out[m + "shared_expert_gate.weight"] = state.at(q + "ffn.shared_gate");
        }
      }
    }
    write_hf_tokenizer(tok, a.out, "");
  } else {
    json model = node_json(mc);
    config = {{"architectures", {"MixDiffForMaskedLM"}},
              {"model_type", "mixdiff"},
              {"auto_map", {{"AutoConfig", "modeling_mixdiff.MixDiffConfig"},
                            {"AutoModel", "modeling_mixdiff.MixDiffForMaskedLM"},
                            {"AutoModelForMaskedLM", "modeling_mixdiff.MixDiffForMaskedLM"}}},
              {"vocab_size", V + 1},  // the embedding's rows: the tokens and [MASK]
              {"d_model", o.d_model},
              {"n_layer", o.n_layer},
              {"n_head", o.n_head},
              {"n_kv_head", o.n_kv_head},
              {"head_dim", o.head_dim},
              {"d_ff", o.d_ff},
              {"max_seq_len", o.max_seq_len},
              {"rope_theta", o.rope_theta},
              {"qk_norm", o.qk_norm_projection ? json("projection") : json(o.qk_norm)},
              {"qkv_bias", o.qkv_bias},
              {"tie_embeddings", o.tie_embeddings},
              {"attention", o.attention},
              {"block_size", o.block_size},
              {"norm_eps", o.norm_eps},
              {"layer_pattern", pattern},
              {"moe", moe},
              {"mask_token_id", V},
              {"eos_token_id", tok.eos_id()},
              {"mixdiff_model", model}};
    for (auto& kv : state) {  // what the modeling file holds: parameters and the selection bias
      const std::string& n = kv.first;
      if (n.find("usage_") != std::string::npos) continue;
      out[n] = kv.second;
    }
    write_file_atomic(a.out + "/modeling_mixdiff.py", kHfModelingPy);
    write_hf_tokenizer(tok, a.out, "<|mask|>");
  }
  save_safetensors(a.out + "/model.safetensors", out, {{"format", "pt"}});
  write_file_atomic(a.out + "/config.json", config.dump(2) + "\n");
  std::cout << "export-hf: " << net->describe() << "\n  -> "
            << (fam ? std::string(fam->architecture) : std::string("MixDiffForMaskedLM (trust_remote_code)"))
            << ", " << out.size() << " tensors, in " << a.out;
  if (!fam && !why_not.empty()) std::cout << "\n  not a causal architecture: " << why_not;
  std::cout << std::endl;
  return 0;
}

}  // namespace mixdiff
