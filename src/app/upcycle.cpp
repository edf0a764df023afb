// `mixdiff upcycle --ckpt SRC --recipe TARGET --out DIR`: turns a checkpoint into the starting
// checkpoint of a bigger MoE (algorithms.md section 5), written as a resumable run in DIR
// (`mixdiff train --resume DIR` continues), with its provenance in trainer_state.json.
//
// Per block, by what the source and the target hold:
//   dense -> MoE (sparse upcycling, Komatsuzaki et al.; granular form of He et al. / Megatron's
//     upcycling_utils): with granularity g = d_ff / d_expert, the dense FFN is cut into g slices of
//     its intermediate dimension and the slices are repeated to fill the E experts (expert
//     e = copy * g + slice); the router gets "virtual group" rows (the target's fresh first E / g
//     rows, each repeated g times) so that the slices of one copy tie. Choice made here: only
//     w_down is multiplied by g (exact, since SwiGLU is linear in w_down; Megatron's g^(1/3) on
//     all three matrices is only approximate through SiLU). Shared experts start with w_down = 0.
//     The function is preserved when the gates of the K chosen slots sum to 1 (renormalised
//     top-K, or sigmoid with normalize, or softmax after top-K; scaling 1) and K = g (or g = 1).
//   E -> mE (expert upcycling, arXiv 2604.19835): experts are copied (uniform: each m - 1 times;
//     utility: greedy by a per-expert score with at most `max_duplicates` copies each; scores
//     weight_norm, gradient_squared, weight_grad_product or approx_fisher of the gate/up weights,
//     gradients from `utility_batches` batches of training data), router rows copied exactly, and
//     the router's aux-free bias extended. copies: dormant (default) gives the copies the source's
//     bias minus `dormant_margin`, so at step 0 no copy is chosen and the model computes exactly
//     the source's function (with renormalised gates); the bias balancing then wakes them (every
//     step raises an unused copy's bias by the rate). copies: paper adds N(0, (0.01 std b)^2)
//     noise to the source's bias instead (the paper's bias_only; not function-preserving).
//   Everything else is copied by name; target tensors that nothing maps are an error.
// Optimizer state (`optimizer: copy`, the paper's default): Adam moments and step of every copied
// tensor are copied, an expert copy's moments are its source's; parameters made from dense slices
// start without state. `optimizer: reset` starts every parameter without state.
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <iostream>
#include <map>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>

#include "app/app.h"
#include "core/compat.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "diffusion/diffusion.h"
#include "infer/sampler.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mixdiff {

namespace fs = std::filesystem;

namespace {

using NamedTensors = std::map<std::string, at::Tensor>;

NamedTensors named_state(const torch::nn::Module& m) {
  NamedTensors out;
  for (auto& kv : model_state(m)) out.emplace(kv.first, kv.second);
  return out;
}

/// Per-expert utility of the gate/up ("fc1") weights of a stacked expert tensor pair.
at::Tensor expert_utility(const std::string& metric, const at::Tensor& wg, const at::Tensor& wu,
                          const at::Tensor& gg, const at::Tensor& gu, const at::Tensor& vg,
                          const at::Tensor& vu) {
  const int64_t E = wg.size(0);
  auto w = torch::cat({wg.reshape({E, -1}), wu.reshape({E, -1})}, 1);
  if (metric == "weight_norm") return w.norm(2, 1);
  auto g = torch::cat({gg.reshape({E, -1}), gu.reshape({E, -1})}, 1);
  if (metric == "gradient_squared") return g.pow(2).sum(1);
  if (metric == "weight_grad_product") return w.norm(2, 1) * g.norm(2, 1);
  auto v = torch::cat({vg.reshape({E, -1}), vu.reshape({E, -1})}, 1);
  return g.pow(2).sum(1) / (v.norm(2, 1) + 1e-8);  // approx_fisher
}

/// Greedy selection of `n_new` sources by descending utility, at most `cap` copies each
/// (counts reset when every expert is saturated).
std::vector<int64_t> greedy_sources(const at::Tensor& utility, int64_t n_new, int64_t cap) {
  const int64_t E = utility.size(0);
  auto order = std::get<1>(utility.to(torch::kFloat64).sort(/*stable=*/true, 0, /*descending=*/true));
  std::vector<int64_t> count(static_cast<size_t>(E), 0), src;
  while (static_cast<int64_t>(src.size()) < n_new) {
    int64_t pick = -1;
    for (int64_t i = 0; i < E; ++i) {
      const int64_t e = order[i].item<int64_t>();
      if (count[static_cast<size_t>(e)] < cap) {
        pick = e;
        break;
      }
    }
    if (pick < 0) {
      std::fill(count.begin(), count.end(), 0);
      continue;
    }
    src.push_back(pick);
    ++count[static_cast<size_t>(pick)];
  }
  return src;
}

/// Gradients of the source model's diffusion loss over `batches` training batches.
void accumulate_gradients(TrainerParts& p, int64_t batches, int64_t cursor) {
  auto& model = *p.model;
  model.train();
  model.zero_grad();
  for (int64_t b = 0; b < batches; ++b) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(97 + b));
    auto x0 = p.data->train_batch(cursor + b * p.options.batch_size, p.options.batch_size);
    auto t = sample_t(x0.size(0), *p.schedule, gen);
    DiffusionBatch batch = corrupt(x0, t, *p.schedule, model.mask_id(), gen);
    ModelOutput out = model.forward(ModelInput(batch.xt_BL, batch.index_M));
    at::Tensor total;
    for (auto& l : p.losses) {
      if (l.routing) continue;
      auto v = l.term->compute(out, batch) * l.weight;
      total = total.defined() ? total + v : v;
    }
    (total / static_cast<double>(batches)).backward();
  }
}

}  // namespace

int cmd_upcycle(const UpcycleArgs& a) {
  torch::NoGradGuard outer_ng;
  const std::string src_ckpt = resolve_checkpoint(a.ckpt);
  nlohmann::json src_state = verify_checkpoint(src_ckpt);
  ConfigNode src_recipe = ConfigNode::from_file(src_ckpt + "/recipe.yaml");
  TrainerParts src = build_trainer_parts(src_recipe);
  load_model_weights(*src.model, src_ckpt + "/model.safetensors");
  const bool src_has_opt = fs::exists(src_ckpt + "/optimizer.pt");
  if (src_has_opt) load_optimizer_state(*src.optimizer, src_ckpt + "/optimizer.pt");

  ConfigNode target = ConfigNode::from_file(a.recipe);
  for (const auto& o : a.overrides) target.apply_override(o);
  TrainerParts tgt = build_trainer_parts(target);
  GenerateSettings::from(target);
  const UpcycleOptions u = UpcycleOptions::from(target.section("upcycle"));
  target.check_unknown_keys();
  if (src.model->vocab_size() != tgt.model->vocab_size()) {
    throw ConfigError(str(a.recipe, ": the target's vocabulary (", tgt.model->vocab_size(),
                          ") differs from the source checkpoint's (", src.model->vocab_size(), ")"));
  }
  if (!a.out.empty() && fs::exists(a.out + "/checkpoints")) {
    throw ConfigError(str("upcycle: '", a.out, "' already holds checkpoints; choose another --out"));
  }

  NamedTensors S = named_state(*src.model), T = named_state(*tgt.model);
  std::set<std::string> done, used;
  nlohmann::json prov_layers = nlohmann::json::array();
  bool preserving = true;
  std::vector<std::string> caveats;
  // Target router options decide whether gates of the chosen slots sum to one.
  ConfigNode tmoe = target.at("model").section("moe");
  ConfigNode trouter = tmoe.section("router");
  const std::string score = trouter.get<std::string>("score", "softmax");
  const bool renormalised = trouter.get<bool>("normalize", score == "sigmoid") ||
                            trouter.get<std::string>("softmax", "before_topk") == "after_topk";
  const int64_t top_k = trouter.get<int64_t>("top_k", 1);
  const double scaling = trouter.get<double>("scaling", 1.0);
  if (trouter.get<int64_t>("n_null", 0) > 0) {
    throw ConfigError(str(a.recipe, ": upcycling into null experts is not supported"));
  }
  if (!renormalised || scaling != 1.0) {
    preserving = false;
    caveats.push_back("gates of the chosen experts do not sum to 1 (no renormalisation or a "
                      "scaling factor): the upcycled function differs from the source's");
  }
  if (tmoe.get<double>("capacity_factor", 0.0) > 0) {
    preserving = false;
    caveats.push_back("a capacity factor may drop assignments");
  }

  // Gradients (and Adam second moments) for utility-based selection.
  bool have_grads = false;
  auto grads_once = [&] {
    if (have_grads) return;
    torch::AutoGradMode enable(true);
    accumulate_gradients(src, u.utility_batches, src_state.value("data_cursor", int64_t(0)));
    have_grads = true;
  };

  std::map<std::string, at::Tensor> source_of;  // target tensor -> its new value
  std::map<std::string, std::vector<int64_t>> expert_sources;  // target expert tensor -> rows
  const std::regex expert_re(R"(^layers\.(\d+)\.ffn\.experts\.w_gate$)");
  for (const auto& [name, tensor] : T) {
    std::smatch m;
    if (!std::regex_match(name, m, expert_re)) continue;
    const std::string pre = "layers." + m[1].str() + ".ffn.";
    const int64_t E = tensor.size(0), F = tensor.size(1);
    nlohmann::json lj = {{"block", std::stoi(m[1].str())}, {"experts", E}};
    if (S.count(pre + "w_gate") && !S.count(pre + "experts.w_gate")) {
      // dense -> MoE
      const auto& wg = S.at(pre + "w_gate");
      const auto& wu = S.at(pre + "w_up");
      const auto& wd = S.at(pre + "w_down");
      const int64_t Fd = wg.size(0);
      if (Fd % F != 0 || E % (Fd / F) != 0) {
        throw ConfigError(str(a.recipe, ": block ", m[1].str(), ": the dense d_ff ", Fd,
                              " must be a multiple g of d_expert ", F,
                              " and n_expert a multiple of g"));
      }
      const int64_t g = Fd / F;
      std::vector<at::Tensor> G, U, Dn;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t sl = e % g;
        G.push_back(wg.narrow(0, sl * F, F));
        U.push_back(wu.narrow(0, sl * F, F));
        Dn.push_back(wd.narrow(1, sl * F, F) * static_cast<double>(g));
      }
      source_of[pre + "experts.w_gate"] = torch::stack(G);
      source_of[pre + "experts.w_up"] = torch::stack(U);
      source_of[pre + "experts.w_down"] = torch::stack(Dn);
      const auto& rw = T.at(pre + "router.weight");
      source_of[pre + "router.weight"] = rw.narrow(0, 0, E / g).repeat_interleave(g, 0);
      if (T.count(pre + "shared.w_down")) {
        source_of[pre + "shared.w_gate"] = T.at(pre + "shared.w_gate");
        source_of[pre + "shared.w_up"] = T.at(pre + "shared.w_up");
        source_of[pre + "shared.w_down"] = torch::zeros_like(T.at(pre + "shared.w_down"));
      }
      for (const char* k : {"router.balancer.bias", "router.balancer.updates", "router.balancer.dual"}) {
        if (T.count(pre + k)) source_of[pre + k] = T.at(pre + k);  // fresh
      }
      if (g > 1 && top_k != g) {
        preserving = false;
        caveats.push_back(str("block ", m[1].str(), ": granularity ", g, " with top-", top_k,
                              " (exact only when top_k equals the granularity)"));
      }
      for (const char* k : {"w_gate", "w_up", "w_down"}) used.insert(pre + k);
      lj["from"] = "dense";
      lj["granularity"] = g;
      lj["copies_of_dense"] = E / g;
    } else if (S.count(pre + "experts.w_gate")) {
      const auto& sg = S.at(pre + "experts.w_gate");
      const int64_t Es = sg.size(0);
      if (sg.size(1) != F || E < Es) {
        throw ConfigError(str(a.recipe, ": block ", m[1].str(), ": cannot upcycle ", Es,
                              " experts of width ", sg.size(1), " into ", E, " of width ", F));
      }
      const int64_t n_new = E - Es;
      std::vector<int64_t> sources;
      at::Tensor utility;
      if (u.selection == "uniform") {
        if (n_new % Es != 0) {
          throw ConfigError(str(a.recipe, ": uniform selection needs n_expert a multiple of the "
                                "source's ", Es, " (got ", E, "); use selection: utility"));
        }
        for (int64_t r = 0; r < n_new / Es; ++r) {
          for (int64_t e = 0; e < Es; ++e) sources.push_back(e);
        }
      } else {
        at::Tensor gg, gu, vg, vu;
        auto sp = src.model->named_parameters();
        if (u.metric != "weight_norm") {
          grads_once();
          gg = sp[pre + "experts.w_gate"].grad();
          gu = sp[pre + "experts.w_up"].grad();
          if (!gg.defined()) gg = torch::zeros_like(sg), gu = torch::zeros_like(sg);
        }
        if (u.metric == "approx_fisher") {
          if (!src_has_opt) {
            throw ConfigError(str(src_ckpt, ": approx_fisher needs the source's optimizer.pt"));
          }
          vg = compat::adamw_moments(*src.optimizer, sp[pre + "experts.w_gate"]).exp_avg_sq;
          vu = compat::adamw_moments(*src.optimizer, sp[pre + "experts.w_up"]).exp_avg_sq;
          if (!vg.defined()) vg = torch::zeros_like(sg), vu = torch::zeros_like(sg);
        }
        utility = expert_utility(u.metric, sg, S.at(pre + "experts.w_up"), gg, gu, vg, vu);
        sources = greedy_sources(utility, n_new, u.max_duplicates);
      }
      auto idx = torch::tensor(sources, torch::kLong);
      for (const char* k : {"experts.w_gate", "experts.w_up", "experts.w_down"}) {
        const auto& s = S.at(pre + k);
        source_of[pre + k] = torch::cat({s, s.index_select(0, idx)});
        used.insert(pre + k);
        expert_sources[pre + k] = sources;
      }
      const auto& rw = S.at(pre + "router.weight");
      source_of[pre + "router.weight"] = torch::cat({rw, rw.index_select(0, idx)});
      used.insert(pre + "router.weight");
      if (T.count(pre + "router.balancer.bias")) {
        at::Tensor b = S.count(pre + "router.balancer.bias") ? S.at(pre + "router.balancer.bias")
                                                             : torch::zeros({Es});
        used.insert(pre + "router.balancer.bias");
        auto nb = b.index_select(0, idx);
        if (u.copies == "dormant") {
          nb = nb - u.dormant_margin;
        } else {
          auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(u.seed));
          const double sd = Es > 1 ? b.std().item<double>() : 0.0;
          nb = nb + torch::randn({n_new}, gen) * (0.01 * sd);
          preserving = false;
          caveats.push_back("copies: paper gives copies the source's bias plus noise; copies can "
                            "be chosen at step 0");
        }
        source_of[pre + "router.balancer.bias"] = torch::cat({b, nb});
      } else if (n_new > 0) {
        preserving = false;
        caveats.push_back(str("block ", m[1].str(), ": the target router has no aux-free bias, so "
                              "copies tie with their sources (set model.moe.router.balancer: "
                              "{kind: aux_free} for an exact upcycle)"));
      }
      if (T.count(pre + "router.balancer.updates")) {
        source_of[pre + "router.balancer.updates"] =
            S.count(pre + "router.balancer.updates") ? S.at(pre + "router.balancer.updates")
                                                     : T.at(pre + "router.balancer.updates");
        used.insert(pre + "router.balancer.updates");
      }
      lj["from"] = str(Es, " experts");
      lj["sources"] = sources;
      if (utility.defined()) {
        const auto u64 = utility.to(torch::kFloat64).contiguous();
        lj["utility"] = std::vector<double>(u64.data_ptr<double>(), u64.data_ptr<double>() + Es);
      }
    } else {
      throw ConfigError(str(src_ckpt, ": block ", m[1].str(), " has neither a dense FFN nor "
                                      "experts to upcycle from"));
    }
    prov_layers.push_back(lj);
  }
  // Everything else by name and shape.
  for (const auto& [name, tensor] : T) {
    if (source_of.count(name)) continue;
    auto it = S.find(name);
    if (it == S.end() || it->second.sizes() != tensor.sizes()) {
      throw ConfigError(str(src_ckpt, ": the target's tensor '", name, "' ", tensor.sizes(),
                            it == S.end() ? " has no source" : " has a different shape in the source"));
    }
    source_of[name] = it->second;
    used.insert(name);
  }
  for (const auto& [name, tensor] : S) {
    if (!used.count(name)) {
      throw ConfigError(str(src_ckpt, ": the source's tensor '", name,
                            "' has no place in the target (recipe and checkpoint differ)"));
    }
  }
  for (auto& [name, tensor] : T) tensor.copy_(source_of.at(name));

  // Optimizer state.
  if (u.optimizer == "copy" && src_has_opt) {
    auto sp = src.model->named_parameters(), tp = tgt.model->named_parameters();
    for (const auto& kv : tp) {
      const std::string& name = kv.key();
      if (!sp.contains(name)) continue;
      const compat::AdamMoments m = compat::adamw_moments(*src.optimizer, sp[name]);
      if (!m.exp_avg.defined()) continue;
      compat::AdamMoments n = m;
      if (m.exp_avg.sizes() != kv.value().sizes()) {
        auto it = expert_sources.find(name);
        const bool router = name.size() > 14 && name.compare(name.size() - 14, 14, ".router.weight") == 0;
        std::vector<int64_t> rows;
        if (it != expert_sources.end()) {
          rows = it->second;
        } else if (router) {
          const std::string pre = name.substr(0, name.size() - 13);
          rows = expert_sources.at(pre + "experts.w_gate");
        } else {
          continue;
        }
        auto idx = torch::tensor(rows, torch::kLong);
        n.exp_avg = torch::cat({m.exp_avg, m.exp_avg.index_select(0, idx)});
        n.exp_avg_sq = torch::cat({m.exp_avg_sq, m.exp_avg_sq.index_select(0, idx)});
      }
      compat::set_adamw_moments(*tgt.optimizer, kv.value(), n);
    }
  }

  const std::string out = a.out.empty() ? "runs/" + tgt.name : a.out;
  fs::create_directories(out);
  const std::string resolved = target.to_yaml();
  write_file_atomic(out + "/recipe.yaml", resolved);
  const int64_t step = u.reset_step ? 0 : src_state.value("step", int64_t(0));
  nlohmann::json provenance = {
      {"method", "upcycle"},
      {"source_checkpoint", fs::absolute(src_ckpt).string()},
      {"source_model", src.model->describe()},
      {"source_step", src_state.value("step", int64_t(0))},
      {"source_model_fnv1a64", fnv1a64_file(src_ckpt + "/model.safetensors")},
      {"selection", u.selection},
      {"metric", u.metric},
      {"copies", u.copies},
      {"optimizer", src_has_opt ? u.optimizer : "reset (the source has no optimizer.pt)"},
      {"function_preserving", preserving},
      {"caveats", caveats},
      {"blocks", prov_layers}};
  CheckpointContent c;
  c.model = tgt.model.get();
  c.optimizer = tgt.optimizer.get();
  c.recipe_yaml = resolved;
  c.tokenizer_dir = src_ckpt + "/tokenizer";
  c.trainer_state = {{"tokens", u.reset_step ? 0 : src_state.value("tokens", int64_t(0))},
                     {"data_cursor", src_state.value("data_cursor", int64_t(0))},
                     {"seed", tgt.seed},
                     {"elapsed_s", 0.0},
                     {"last_val_nelbo", -1.0},
                     {"world_size", 1},
                     {"replicas_identical", true},
                     {"provenance", provenance}};
  const std::string dir = save_checkpoint(out, step, c, 0);
  std::cout << "upcycle: " << src.model->describe() << "\n     -> " << tgt.model->describe()
            << "\n  " << tgt.model->num_parameters() << " parameters ("
            << tgt.model->num_active_parameters() << " active per token); "
            << (preserving ? "function-preserving at step 0" : "NOT function-preserving:");
  for (const auto& cv : caveats) std::cout << "\n    - " << cv;
  std::cout << "\n  wrote " << dir << "; continue with: mixdiff train --resume " << out
            << std::endl;
  return 0;
}

}  // namespace mixdiff
