// Expert-choice routing: exact per-expert capacity, capacity schedules over the mask ratio and
// their matched-FLOP mean, empty tokens without NaN, and retrofitting a token-choice checkpoint.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/safetensors.h"
#include "infer/sampler.h"
#include "moe/capacity.h"
#include "moe/router.h"
#include "support/support.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mixdiff {
namespace {

std::shared_ptr<RouterBase> ec(const std::string& yaml, int64_t d, int64_t E) {
  ConfigNode c = ConfigNode::from_string(yaml, "ec.yaml");
  auto r = routers_registry().create("expert_choice", "kind", c, RouterDims{d, E});
  return r;
}

RoutingContext seq_ctx(int64_t B, int64_t L, const std::vector<float>& ratios) {
  RoutingContext ctx;
  ctx.n_seq = B;
  ctx.seq_T = torch::arange(B, torch::kLong).repeat_interleave(L);
  ctx.mask_ratio_B = torch::tensor(ratios);
  return ctx;
}

TEST(UnitExpertChoice, EveryExpertTakesExactlyCTokensOfEverySequence) {
  torch::manual_seed(0);
  const int64_t B = 3, L = 16, E = 4, D = 8;
  for (const char* gates : {"post_softmax", "pre_softmax", "sigmoid"}) {
    SCOPED_TRACE(gates);
    auto r = ec(std::string("{kind: expert_choice, gates: ") + gates +
                    ", capacity: {kind: constant, k: 1}}",
                D, E);
    auto d = r->route(torch::randn({B * L, D}), seq_ctx(B, L, {0.2f, 0.5f, 0.9f}));
    const int64_t C = L * 1 / E;  // 4
    auto seq = d.token_A.div(L, "floor");
    auto counts = torch::zeros({B, E}, torch::kLong).index_put_({seq, d.expert_A},
                                                                 torch::ones_like(seq), true);
    EXPECT_TRUE((counts == C).all().item<bool>()) << counts;
    EXPECT_TRUE(torch::isfinite(d.gate_A).all().item<bool>());
    auto sums = torch::zeros({B * L}).index_add(0, d.token_A, d.gate_A);
    auto chosen = torch::zeros({B * L}).index_add(0, d.token_A, torch::ones_like(d.gate_A));
    if (std::string(gates) != "pre_softmax") {  // gates of a routed token sum to 1
      EXPECT_LT((sums - (chosen > 0).to(torch::kFloat)).abs().max().item<double>(), 1e-5);
    }
  }
  // Padding tokens are never chosen, and capacity counts only real tokens.
  auto r = ec("{kind: expert_choice, capacity: {kind: constant, k: 2}}", D, E);
  auto ctx = seq_ctx(1, 16, {0.5f});
  ctx.valid_T = torch::arange(16) < 8;
  auto d = r->route(torch::randn({16, D}), ctx);
  EXPECT_TRUE((d.token_A < 8).all().item<bool>());
  EXPECT_EQ(d.token_A.numel(), E * (8 * 2 / E));
}

TEST(UnitExpertChoice, CapacityFollowsTheScheduleAndMatchesTheTargetMean) {
  for (const char* kind : {"linear", "linear_reverse", "cosine", "cosine_reverse", "bell",
                           "bell_gaussian", "bell_gaussian_reverse"}) {
    SCOPED_TRACE(kind);
    ConfigNode c = ConfigNode::from_string(
        std::string("{kind: ") + kind + ", k_min: 1, k_max: 5, k_target: 3}", "cap.yaml");
    auto s = build_capacity_schedule(c);
    EXPECT_NEAR(s->mean_k(), 3.0, 0.01);  // matched FLOPs with a constant k = 3
    EXPECT_NEAR(s->k_max - s->k_min, 4.0, 1e-9);
  }
  ConfigNode c = ConfigNode::from_string("{kind: linear_reverse, k_min: 2, k_max: 14}", "cap.yaml");
  auto s = build_capacity_schedule(c);
  EXPECT_EQ(s->k(0.0), 14);  // most capacity when little is masked (late in denoising)
  EXPECT_EQ(s->k(1.0), 2);
  EXPECT_EQ(s->k(0.5), 8);
  for (double r = 0; r < 1; r += 0.1) EXPECT_GE(s->k(r), s->k(r + 0.1));
  ConfigNode g = ConfigNode::from_string("{kind: bell, k_min: 2, k_max: 10}", "cap.yaml");
  auto b = build_capacity_schedule(g);
  EXPECT_EQ(b->k(0.5), 10);
  EXPECT_EQ(b->k(0.0), 2);
  EXPECT_EQ(b->k(1.0), 2);
  // Through the router: a sequence at mask ratio 0.1 gets more tokens per expert than one at 0.9.
  torch::manual_seed(1);
  auto r = ec("{kind: expert_choice, capacity: {kind: linear_reverse, k_min: 1, k_max: 4}}", 8, 4);
  auto d = r->route(torch::randn({2 * 32, 8}), seq_ctx(2, 32, {0.1f, 0.9f}));
  auto seq = d.token_A.div(32, "floor");
  const auto n0 = (seq == 0).sum().item<int64_t>(), n1 = (seq == 1).sum().item<int64_t>();
  EXPECT_EQ(n0, 4 * 32);  // k(0.1) = round(1 + 3 * 0.9) = 4 -> C = 32 tokens per expert
  EXPECT_EQ(n1, 4 * 8);   // k(0.9) = round(1 + 3 * 0.1) = 1 -> C = 8
}

const std::string& data_dir() {
  static const std::string d = [] {
    const std::string dir = test::scratch_dir("ec_data");
    test::tiny_setup(dir, dir + "/data");
    return dir;
  }();
  return d;
}

TEST(E2EExpertChoice, RetrofitLoadsEveryNonRouterWeightBitExactlyAndGenerates) {
  const std::string d = test::scratch_dir("ec_retrofit");
  ConfigNode tc = ConfigNode::from_file(data_dir() + "/recipe.yaml");
  tc.apply_override("model.kind=moe_dlm");
  tc.apply_override("model.moe={n_expert: 4, d_expert: 16, n_shared: 1, router: {kind: "
                    "token_choice, top_k: 2, balancer: {kind: aux_free}}}");
  tc.apply_override("train.steps=4");
  test::write_text(d + "/tc.yaml", tc.to_yaml());
  auto t = test::run_mixdiff({"train", d + "/tc.yaml", "--out", d + "/tc"});
  ASSERT_EQ(t.status, 0) << t.err;

  ConfigNode r = ConfigNode::from_file(d + "/tc.yaml");
  r.apply_override("model.moe.router={kind: expert_choice, capacity: {kind: linear_reverse, "
                   "k_min: 1, k_max: 3, k_target: 2}}");
  r.apply_override("init={checkpoint: " + d + "/tc}");
  test::write_text(d + "/ec.yaml", r.to_yaml());
  TrainerParts parts = build_trainer_parts(r);
  GenerateSettings::from(r);
  r.check_unknown_keys();
  std::filesystem::create_directories(d + "/ec_probe");
  auto model = parts.model;
  Trainer trainer(std::move(parts), d + "/ec_probe", r.to_yaml());
  trainer.initialize_from_checkpoint();
  auto src = load_safetensors(resolve_checkpoint(d + "/tc") + "/model.safetensors");
  int64_t checked = 0;
  for (const auto& kv : model_state(*model)) {
    if (kv.first.find(".router.") != std::string::npos) continue;
    ASSERT_TRUE(src.count(kv.first)) << kv.first;
    EXPECT_TRUE(torch::equal(kv.second, src.at(kv.first))) << kv.first;
    ++checked;
  }
  EXPECT_GT(checked, 10);
  // The router matrix has the same shape and is kept; the aux-free bias has no place in EC.
  EXPECT_TRUE(torch::equal(model->named_parameters()["layers.1.ffn.router.weight"],
                           src.at("layers.1.ffn.router.weight")));
  // The retrofitted run trains, records its provenance, and generates with EC routing.
  auto e = test::run_mixdiff({"train", d + "/ec.yaml", "--out", d + "/ec", "--set", "train.steps=3"});
  ASSERT_EQ(e.status, 0) << e.err;
  auto st = nlohmann::json::parse(test::read_text(resolve_checkpoint(d + "/ec") + "/trainer_state.json"));
  EXPECT_EQ(st["provenance"]["method"], "init");
  EXPECT_EQ(st["provenance"]["dropped_router_tensors"].size(), 4u);  // bias + updates, 2 layers
  auto g = test::run_mixdiff({"generate", "--ckpt", d + "/ec"});
  EXPECT_EQ(g.status, 0) << g.err;
  EXPECT_NE(g.out.find("sample: "), std::string::npos);
  const auto m = test::lines(test::read_text(d + "/ec/metrics.jsonl"));
  auto last = nlohmann::json::parse(m.back());
  ASSERT_TRUE(last.contains("moe"));
  EXPECT_TRUE(last["moe"]["layers"][0].contains("unrouted"));
  EXPECT_EQ(last["moe"]["layers"][0]["experts_per_token_hist"].size(), 9u);
}

}  // namespace
}  // namespace mixdiff
