// The architecture registry: UniPool, Chain-of-Experts and ReXMoE reduce to vanilla MoE in their
// degenerate settings (same weights, same router type), parameter counts match closed forms,
// ReXMoE's progressive schedule widens the candidate pool, and upcycled checkpoints compute their
// source's function.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <set>

#include <nlohmann/json.hpp>

#include "core/compat.h"
#include "core/config.h"
#include "core/safetensors.h"
#include "model/model.h"
#include "moe/moe_layer.h"
#include "moe/observers.h"
#include "support/support.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

const char* kBackbone =
    "vocab_size: 50, d_model: 16, n_layer: 3, n_head: 2, d_ff: 32, max_seq_len: 16";

std::shared_ptr<ModelBase> model(const std::string& kind, const std::string& moe) {
  ConfigNode c = ConfigNode::from_string(
      "{kind: " + kind + ", " + kBackbone + ", moe: " + moe + "}", "model.yaml");
  torch::manual_seed(0);
  auto m = build_model(c);
  c.check_unknown_keys();
  m->eval();
  return m;
}

std::map<std::string, at::Tensor> state(ModelBase& m) {
  std::map<std::string, at::Tensor> out;
  for (auto& kv : model_state(m)) out.emplace(kv.first, kv.second);
  return out;
}

// Copies the tensors of `from` into `to`: by name, or through `map` (target name -> source name,
// and a first row when the source fills only part of the target). Tensors without a source of
// the same shape keep their values.
using RowMap = std::function<bool(const std::string& to_name, std::string* from, int64_t* row0)>;

void copy_weights(ModelBase& from, ModelBase& to, const RowMap& map) {
  torch::NoGradGuard ng;
  auto S = state(from), T = state(to);
  for (auto& [name, t] : T) {
    std::string src;
    int64_t row0 = -1;
    if (!map(name, &src, &row0)) src = name, row0 = -1;
    if (!S.count(src)) continue;
    const auto& s = S.at(src);
    if (row0 < 0) {
      if (s.sizes() == t.sizes()) t.copy_(s);
    } else {
      t.narrow(0, row0, s.size(0)).copy_(s);
    }
  }
}

double logit_diff(ModelBase& a, ModelBase& b) {
  torch::manual_seed(3);
  auto x = torch::randint(0, 51, {3, 12});
  auto la = a.forward(ModelInput(x)).logits, lb = b.forward(ModelInput(x)).logits;
  return (la - lb).abs().max().item<double>();
}

const char* kRouterSoftmax = "{kind: token_choice, top_k: 2}";

TEST(ComponentArch, UniPoolWithPartitionMasksEqualsVanillaMoe) {
  for (const std::string& router : {std::string(kRouterSoftmax),
                                   std::string("{kind: norm_router, top_k: 2, init: one}")}) {
    SCOPED_TRACE(router);
    auto vanilla = model("moe_dlm", "{n_expert: 4, d_expert: 8, first_k_dense: 1, router: " + router + "}");
    auto uni = model("unipool_dlm", "{n_expert: 4, d_expert: 8, first_k_dense: 1, visibility: "
                                    "partition, router: " + router + "}");
    // Vanilla block l (l = 1, 2) owns pool slice (l - 1) * 4 .. and its router rows.
    copy_weights(*vanilla, *uni, [](const std::string&, std::string*, int64_t*) { return false; });
    torch::NoGradGuard ng;
    auto V = state(*vanilla), U = state(*uni);
    for (int l : {1, 2}) {
      for (const char* w : {"w_gate", "w_up", "w_down"}) {
        U.at(std::string("pool.") + w).narrow(0, (l - 1) * 4, 4)
            .copy_(V.at("layers." + std::to_string(l) + ".ffn.experts." + w));
      }
      U.at("layers." + std::to_string(l) + ".ffn.router.weight").narrow(0, (l - 1) * 4, 4)
          .copy_(V.at("layers." + std::to_string(l) + ".ffn.router.weight"));
    }
    EXPECT_LT(logit_diff(*vanilla, *uni), 1e-5);
    // Visibility "all" routes differently (the test is not vacuous).
    auto all = model("unipool_dlm", "{n_expert: 4, d_expert: 8, first_k_dense: 1, router: " + router + "}");
    copy_weights(*uni, *all, [](const std::string&, std::string*, int64_t*) { return false; });
    EXPECT_GT(logit_diff(*uni, *all), 1e-4);
  }
}

TEST(ComponentArch, ChainOfExpertsWithOneIterationEqualsVanillaMoe) {
  auto vanilla = model("moe_dlm", "{n_expert: 4, d_expert: 8, n_shared: 1, router: {kind: token_choice, top_k: 2}}");
  for (const char* residual : {"paper", "outer"}) {
    SCOPED_TRACE(residual);
    auto coe = model("coe_dlm", std::string("{n_expert: 4, d_expert: 8, n_shared: 1, iterations: 1, "
                                            "residual: ") + residual +
                                    ", router: {kind: token_choice, top_k: 2}}");
    copy_weights(*vanilla, *coe, [](const std::string& to, std::string* from, int64_t* row0) {
      const auto at = to.find(".ffn.iters.0.router.");
      if (at == std::string::npos) return false;
      *from = to.substr(0, at) + ".ffn.router." + to.substr(at + 20);
      return true;
    });
    EXPECT_LT(logit_diff(*vanilla, *coe), 1e-5);
  }
  // Two iterations compute something else.
  auto two = model("coe_dlm", "{n_expert: 4, d_expert: 8, n_shared: 1, iterations: 2, residual: "
                              "paper, router: {kind: token_choice, top_k: 2}}");
  EXPECT_GT(logit_diff(*vanilla, *two), 1e-4);
}

TEST(ComponentArch, RexmoeWithWindowZeroEqualsVanillaMoe) {
  auto vanilla = model("moe_dlm", "{n_expert: 4, d_expert: 8, router: {kind: token_choice, top_k: 2}}");
  for (const char* sharing : {"{sharing: sliding, window: 0", "{sharing: grouped, window: 1"}) {
    SCOPED_TRACE(sharing);
    auto rex = model("rexmoe_dlm", std::string(sharing) +
                                       ", n_expert: 4, d_expert: 8, router: {kind: token_choice, top_k: 2}}");
    const bool sliding = std::string(sharing).find("sliding") != std::string::npos;
    copy_weights(*vanilla, *rex, [](const std::string&, std::string*, int64_t*) { return false; });
    torch::NoGradGuard ng;
    auto V = state(*vanilla), R = state(*rex);
    for (int l = 0; l < 3; ++l) {
      for (const char* w : {"w_gate", "w_up", "w_down"}) {
        const auto& src = V.at("layers." + std::to_string(l) + ".ffn.experts." + w);
        if (sliding) {
          R.at(std::string("pool.") + w).narrow(0, l * 4, 4).copy_(src);
        } else {
          R.at("pools." + std::to_string(l) + "." + w).copy_(src);
        }
      }
    }
    EXPECT_LT(logit_diff(*vanilla, *rex), 1e-5);
  }
}

TEST(UnitArch, ParameterCountsMatchClosedForms) {
  const int64_t V = 50, D = 16, L = 3, F = 32, hd = 8, H = 2;
  const int64_t backbone = (V + 1) * D + L * ((H + 2 * H) * hd * D + D * H * hd + 2 * D) + D;
  const int64_t dense_ffn = 3 * D * F, expert = 3 * D * 8;
  EXPECT_EQ(model("moe_dlm", "{n_expert: 4, d_expert: 8, first_k_dense: 1, router: {kind: token_choice, top_k: 2}}")
                ->num_parameters(),
            backbone + dense_ffn + 2 * (4 * expert + 4 * D));
  // UniPool: one pool of M experts, routers of M rows; NormRouter adds a scale per layer.
  EXPECT_EQ(model("unipool_dlm", "{n_expert: 4, d_expert: 8, first_k_dense: 1, router: {kind: norm_router, top_k: 2}}")
                ->num_parameters(),
            backbone + dense_ffn + 8 * expert + 2 * (8 * D + 1));
  auto half = model("unipool_dlm", "{n_expert: 4, d_expert: 8, first_k_dense: 1, pool_fraction: 0.5, "
                                   "router: {kind: norm_router, top_k: 2}}");
  EXPECT_EQ(half->num_parameters(), backbone + dense_ffn + 4 * expert + 2 * (4 * D + 1));
  EXPECT_EQ(half->num_active_parameters(), half->num_parameters() - 4 * expert + 2 * 2 * expert);
  // CoE: one expert set and shared expert per block, C routers.
  EXPECT_EQ(model("coe_dlm", "{n_expert: 4, d_expert: 8, n_shared: 1, iterations: 2, residual: paper, "
                             "router: {kind: token_choice, top_k: 1}}")
                ->num_parameters(),
            backbone + 3 * (4 * expert + expert + 2 * 4 * D + D));
  // ReXMoE grouped by 2 over 3 MoE blocks: expert parameters as vanilla, routers of r E rows.
  EXPECT_EQ(model("rexmoe_dlm", "{sharing: grouped, window: 2, n_expert: 4, d_expert: 8, router: "
                                "{kind: token_choice, top_k: 2}}")
                ->num_parameters(),
            backbone + 3 * 4 * expert + (8 + 8 + 4) * D);
}

TEST(UnitArch, TrainingFlopsPerTokenMatchAHandCount) {
  // V 50, D 16, 3 layers of 2 heads x 8, dense SwiGLU 32, sequence length 16.
  // Per token, forward + backward = 6 x the matmul weights it uses + 12 x layers x L x heads x hd.
  const double V = 50, D = 16, F = 32, Ls = 16, attn_w = (2 + 2 * 2) * 8 * D + D * 2 * 8;
  const double attn_scores = 12.0 * 3 * Ls * 2 * 8;
  auto dense = build_model(ConfigNode::from_string(
      std::string("{kind: dense_dlm, ") + kBackbone + "}", "model.yaml"));
  // Head 50 x 16; per layer wqkv 48 x 16 + wo 16 x 16 and 3 x 16 x 32 SwiGLU.
  EXPECT_DOUBLE_EQ(dense->train_flops_per_token(16),
                   6.0 * (V * D + 3 * (attn_w + 3 * D * F)) + attn_scores);
  EXPECT_DOUBLE_EQ(6.0 * (50 * 16 + 3 * (1024 + 1536)) + 9216, dense->train_flops_per_token(16));
  // One dense block, two MoE blocks of top-2 of 4 experts of width 8 plus a shared expert of
  // width 8 and a router of 4 x 16.
  auto moe = model("moe_dlm", "{n_expert: 4, d_expert: 8, n_shared: 1, first_k_dense: 1, "
                              "router: {kind: token_choice, top_k: 2}}");
  const double moe_block = attn_w + 3 * D * (2 * 8 + 8) + 4 * D;
  EXPECT_DOUBLE_EQ(moe->train_flops_per_token(16),
                   6.0 * (V * D + attn_w + 3 * D * F + 2 * moe_block) + attn_scores);
  // Measured experts per token (top-p, null experts, drops) replace K: 1.5 and 0.5 per layer.
  EXPECT_DOUBLE_EQ(moe->train_flops_per_token(16, {1.5, 0.5}),
                   moe->train_flops_per_token(16) - 6.0 * 3 * D * 8 * ((2 - 1.5) + (2 - 0.5)));
  EXPECT_EQ(moe->num_active_parameters(), moe->num_parameters() - 2 * 2 * 3 * 16 * 8);
  EXPECT_EQ(moe->num_active_parameters({1.5, 0.5}),
            moe->num_parameters() - 2 * 4 * 3 * 16 * 8 + (1.5 + 0.5) * 3 * 16 * 8);
  EXPECT_FALSE(moe->experts_per_token_data_dependent());
  // Top-p: no planned count (its max_k bounds the nominal one), null experts likewise.
  EXPECT_TRUE(model("moe_dlm", "{n_expert: 4, d_expert: 8, router: {kind: top_p, p: 0.5}}")
                  ->experts_per_token_data_dependent());
  EXPECT_TRUE(model("moe_dlm", "{n_expert: 4, d_expert: 8, router: {kind: token_choice, top_k: 2, "
                               "n_null: 2}}")
                  ->experts_per_token_data_dependent());
}

TEST(ComponentArch, RexmoeProgressiveRoutingWidensTheCandidatePool) {
  auto rex = model("rexmoe_dlm", "{sharing: grouped, window: 3, n_expert: 4, d_expert: 8, psr_steps: 100, "
                                 "router: {kind: token_choice, top_k: 2}}");
  rex->train();
  auto* l = rex->moe_layers()[1];  // block 1 owns pool experts 4..7
  auto tel = observe_layers<RoutingTelemetry>(std::vector<MoeLayer*>{l})[0];
  auto seen = [&](int64_t step) {
    RoutingContext ctx;
    ctx.step = step;
    std::set<int64_t> experts;
    for (int i = 0; i < 5; ++i) {
      auto y = l->forward(torch::randn({4, 8, 16}), &ctx);
      (void)y;
    }
    auto j = tel->take();
    auto counts = j["tokens_per_expert"].get<std::vector<double>>();
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] > 0) experts.insert(static_cast<int64_t>(e));
    }
    return experts;
  };
  const auto at0 = seen(0);
  for (int64_t e : at0) EXPECT_TRUE(e >= 4 && e < 8) << e;  // own experts only
  EXPECT_GT(seen(100).size(), 4u);                          // all twelve candidates open
}

TEST(ComponentArch, PoolBalanceUsesThePreviousMicroBatchOfEveryLayer) {
  auto uni = model("unipool_dlm", "{n_expert: 2, d_expert: 8, router: {kind: norm_router, top_k: 1}}");
  ConfigNode lc = ConfigNode::from_string("{kind: pool_balance}", "l.yaml");
  auto loss = routing_losses_registry().create("pool_balance", "", lc);
  for (auto* l : uni->moe_layers()) l->set_aux_losses({{"pool_balance", 1.0, loss}});
  uni->train();
  auto x = torch::randint(0, 50, {2, 8});
  uni->forward(ModelInput(x));
  std::vector<double> first;
  for (auto* l : uni->moe_layers()) first.push_back(l->take_aux_values()[0]);
  for (double v : first) EXPECT_EQ(v, 0.0);  // no previous micro-batch yet
  uni->forward(ModelInput(x));
  for (auto* l : uni->moe_layers()) EXPECT_GT(l->take_aux_values()[0], 0.0);
  EXPECT_EQ(state(*uni).at("pool.usage_ready").item<double>(), 1.0);
}

// ---- upcycling ----

const std::string& data_dir() {
  static const std::string d = [] {
    const std::string dir = test::scratch_dir("upcycle_data");
    test::tiny_setup(dir, dir + "/data");
    return dir;
  }();
  return d;
}

std::string recipe_with(const std::string& dir, const std::string& name,
                        const std::vector<std::string>& sets) {
  ConfigNode r = ConfigNode::from_file(data_dir() + "/recipe.yaml");
  for (const auto& s : sets) r.apply_override(s);
  const std::string path = dir + "/" + name + ".yaml";
  test::write_text(path, r.to_yaml());
  return path;
}

std::shared_ptr<ModelBase> load(const std::string& run) {
  const std::string ckpt = resolve_checkpoint(run);
  ConfigNode r = ConfigNode::from_file(ckpt + "/recipe.yaml");
  auto m = build_model(r.at("model"));
  load_model_weights(*m, ckpt + "/model.safetensors");
  m->eval();
  return m;
}

double run_logit_diff(const std::string& a, const std::string& b) {
  auto ma = load(a), mb = load(b);
  torch::NoGradGuard ng;
  return logit_diff(*ma, *mb);
}

TEST(E2EUpcycle, DenseToMoeAndGranularUpcyclingPreserveTheFunction) {
  const std::string d = test::scratch_dir("upcycle_dense");
  auto t = test::run_mixdiff({"train", recipe_with(d, "dense", {"train.steps=4"}), "--out", d + "/dense"});
  ASSERT_EQ(t.status, 0) << t.err;
  struct Case {
    const char* name;
    const char* moe;
  } cases[] = {
      {"copies", "{n_expert: 4, d_expert: 64, n_shared: 1, router: {kind: token_choice, top_k: 2, normalize: true}}"},
      {"granular", "{n_expert: 4, d_expert: 32, router: {kind: token_choice, top_k: 2, normalize: true}}"},
      {"sigmoid", "{n_expert: 8, d_expert: 16, router: {kind: token_choice, top_k: 4, score: sigmoid}}"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string target = recipe_with(d, c.name, {"model.kind=moe_dlm", std::string("model.moe=") + c.moe,
                                                       "train.steps=8"});
    auto u = test::run_mixdiff({"upcycle", "--ckpt", d + "/dense", "--recipe", target, "--out",
                                d + "/" + c.name});
    ASSERT_EQ(u.status, 0) << u.err << u.out;
    EXPECT_NE(u.out.find("function-preserving at step 0"), std::string::npos) << u.out;
    EXPECT_LT(run_logit_diff(d + "/dense", d + "/" + c.name), 1e-4);
    auto st = nlohmann::json::parse(test::read_text(resolve_checkpoint(d + "/" + c.name) + "/trainer_state.json"));
    EXPECT_EQ(st["provenance"]["method"], "upcycle");
    EXPECT_EQ(st["provenance"]["blocks"][0]["from"], "dense");
  }
  // The upcycled run continues training and keeps its provenance.
  auto r = test::run_mixdiff({"train", "--resume", d + "/copies"});
  ASSERT_EQ(r.status, 0) << r.err;
  auto st = nlohmann::json::parse(test::read_text(resolve_checkpoint(d + "/copies") + "/trainer_state.json"));
  EXPECT_EQ(st["step"], 8);
  EXPECT_EQ(st["provenance"]["method"], "upcycle");
}

// The AdamW moments of every parameter of a run's latest checkpoint, by parameter name.
std::map<std::string, compat::AdamMoments> adam_state(const std::string& run) {
  const std::string ckpt = resolve_checkpoint(run);
  TrainerParts p = build_trainer_parts(ConfigNode::from_file(ckpt + "/recipe.yaml"));
  load_model_weights(*p.model, ckpt + "/model.safetensors");
  load_optimizer_state(*p.optimizer, ckpt + "/optimizer.pt");
  std::map<std::string, compat::AdamMoments> out;
  for (const auto& kv : p.model->named_parameters()) {
    out.emplace(kv.key(), compat::adamw_moments(*p.optimizer, kv.value()));
  }
  return out;
}

TEST(E2EUpcycle, ExpertUpcyclingCopiesExpertsRouterAndOptimizerState) {
  const std::string d = test::scratch_dir("upcycle_moe");
  const std::string moe4 =
      "model.moe={n_expert: 4, d_expert: 16, router: {kind: token_choice, top_k: 2, score: "
      "sigmoid, balancer: {kind: aux_free, rate: 0.01}}}";
  auto t = test::run_mixdiff({"train", recipe_with(d, "e4", {"model.kind=moe_dlm", moe4, "train.steps=6"}),
                              "--out", d + "/e4"});
  ASSERT_EQ(t.status, 0) << t.err;
  struct Case {
    const char* name;
    int experts;
    const char* upcycle;
  } cases[] = {{"uniform", 8, "{selection: uniform}"},
               {"utility_grad", 6, "{selection: utility, metric: gradient_squared, utility_batches: 2}"},
               {"utility_fisher", 7, "{selection: utility, metric: approx_fisher, max_duplicates: 1}"}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string target = recipe_with(
        d, c.name,
        {"model.kind=moe_dlm",
         "model.moe={n_expert: " + std::to_string(c.experts) +
             ", d_expert: 16, router: {kind: token_choice, top_k: 2, score: sigmoid, balancer: "
             "{kind: aux_free, rate: 0.01}}}",
         std::string("upcycle=") + c.upcycle, "train.steps=10"});
    auto u = test::run_mixdiff({"upcycle", "--ckpt", d + "/e4", "--recipe", target, "--out", d + "/" + c.name});
    ASSERT_EQ(u.status, 0) << u.err << u.out;
    EXPECT_LT(run_logit_diff(d + "/e4", d + "/" + c.name), 1e-5);
    auto st = nlohmann::json::parse(test::read_text(resolve_checkpoint(d + "/" + c.name) + "/trainer_state.json"));
    const auto sources = st["provenance"]["blocks"][0]["sources"].get<std::vector<int64_t>>();
    const auto sources1 = st["provenance"]["blocks"][1]["sources"].get<std::vector<int64_t>>();
    ASSERT_EQ(sources.size(), static_cast<size_t>(c.experts - 4));
    EXPECT_EQ(st["step"], 6);  // continues the source's schedule
    // Copies hold their source's weights and router row.
    auto S = load_safetensors(resolve_checkpoint(d + "/e4") + "/model.safetensors");
    auto T = load_safetensors(resolve_checkpoint(d + "/" + c.name) + "/model.safetensors");
    for (size_t j = 0; j < sources.size(); ++j) {
      EXPECT_TRUE(torch::equal(T.at("layers.0.ffn.experts.w_up")[4 + static_cast<int64_t>(j)],
                               S.at("layers.0.ffn.experts.w_up")[sources[j]]));
      EXPECT_TRUE(torch::equal(T.at("layers.1.ffn.router.weight")[4 + static_cast<int64_t>(j)],
                               S.at("layers.1.ffn.router.weight")[sources1[j]]));
    }
    if (std::string(c.name) == "utility_fisher") {  // at most one copy of each expert
      EXPECT_EQ(std::set<int64_t>(sources.begin(), sources.end()).size(), sources.size());
    }
    // Adam moments (optimizer: copy): the originals keep theirs, a copy gets its source's.
    auto src = adam_state(d + "/e4"), dst = adam_state(d + "/" + c.name);
    for (const char* name : {"layers.0.ffn.experts.w_up", "layers.0.ffn.experts.w_down"}) {
      SCOPED_TRACE(name);
      const auto& ms = src.at(name);
      const auto& mt = dst.at(name);
      ASSERT_TRUE(ms.exp_avg.defined() && mt.exp_avg.defined());
      EXPECT_GT(ms.exp_avg_sq.abs().sum().item<double>(), 0.0);  // the source has trained
      EXPECT_TRUE(torch::equal(mt.exp_avg.narrow(0, 0, 4), ms.exp_avg));
      EXPECT_TRUE(torch::equal(mt.exp_avg_sq.narrow(0, 0, 4), ms.exp_avg_sq));
      for (size_t j = 0; j < sources.size(); ++j) {
        EXPECT_TRUE(torch::equal(mt.exp_avg[4 + static_cast<int64_t>(j)], ms.exp_avg[sources[j]]));
        EXPECT_TRUE(
            torch::equal(mt.exp_avg_sq[4 + static_cast<int64_t>(j)], ms.exp_avg_sq[sources[j]]));
      }
    }
    const auto& rs = src.at("layers.1.ffn.router.weight");
    const auto& rt = dst.at("layers.1.ffn.router.weight");
    for (size_t j = 0; j < sources1.size(); ++j) {
      EXPECT_TRUE(torch::equal(rt.exp_avg[4 + static_cast<int64_t>(j)], rs.exp_avg[sources1[j]]));
    }
    auto r = test::run_mixdiff({"train", "--resume", d + "/" + c.name});
    EXPECT_EQ(r.status, 0) << r.err;
  }
}

TEST(E2EUpcycle, MismatchedTargetsAreRefusedWithTheTensorName) {
  const std::string d = test::scratch_dir("upcycle_bad");
  auto t = test::run_mixdiff({"train", recipe_with(d, "dense", {"train.steps=2"}), "--out", d + "/dense"});
  ASSERT_EQ(t.status, 0) << t.err;
  const std::string wide = recipe_with(d, "wide", {"model.d_model=48", "model.n_head=3"});
  auto u = test::run_mixdiff({"upcycle", "--ckpt", d + "/dense", "--recipe", wide, "--out", d + "/w"});
  EXPECT_EQ(u.status, 2);
  EXPECT_NE(u.err.find("has a different shape in the source"), std::string::npos) << u.err;
}

}  // namespace
}  // namespace mixdiff
