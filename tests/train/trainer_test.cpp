// End-to-end training on the tiny fixture corpus: the loss falls, runs are deterministic, a
// resumed run equals the uninterrupted one, and damaged checkpoints are refused.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "core/safetensors.h"
#include "data/prepare.h"
#include "infer/sampler.h"
#include "support/support.h"
#include "train/checkpoint.h"
#include "train/optim.h"
#include "train/trainer.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

// Shared prepared data for the tests of this file.
const std::string& data_dir() {
  static const std::string d = [] {
    const std::string dir = test::scratch_dir("train_data");
    test::tiny_setup(dir, dir + "/data");
    return dir + "/data";
  }();
  return d;
}

// Trains the tiny recipe (plus overrides) into `run_dir`, optionally resuming.
int train(const std::string& run_dir, const std::vector<std::string>& overrides,
          const std::string& resume = "") {
  const std::string recipe_path = run_dir + ".recipe.yaml";
  test::write_text(recipe_path, test::tiny_recipe(data_dir()));
  ConfigNode r = ConfigNode::from_file(recipe_path);
  for (const auto& o : overrides) r.apply_override(o);
  TrainerParts parts = build_trainer_parts(r);
  GenerateSettings::from(r);
  r.check_unknown_keys();
  fs::create_directories(run_dir);
  Trainer t(std::move(parts), run_dir, r.to_yaml());
  if (!resume.empty()) t.restore(resolve_checkpoint(resume));
  return t.fit();
}

std::vector<nlohmann::json> metrics(const std::string& run_dir) {
  std::vector<nlohmann::json> out;
  for (const auto& l : test::lines(test::read_text(run_dir + "/metrics.jsonl"))) {
    out.push_back(nlohmann::json::parse(l));
  }
  return out;
}

std::vector<double> losses(const std::string& run_dir) {
  std::vector<double> out;
  for (const auto& m : metrics(run_dir)) {
    if (m.contains("loss")) out.push_back(m["loss"].get<double>());
  }
  return out;
}

// The fused AdamW with the clip factor folded into its update equals clip_grad_norm_ followed by
// LibTorch's AdamW, step after step, and leaves the gradients unset.
TEST(ComponentOptim, FusedAdamWWithFoldedClipEqualsLibTorch) {
  auto make = [](bool fused) {
    torch::manual_seed(7);
    auto m = std::make_shared<torch::nn::Sequential>(torch::nn::Linear(24, 40),
                                                     torch::nn::Linear(40, 8));
    ConfigNode c = ConfigNode::from_string(
        str("kind: adamw\nlr: 0.01\nweight_decay: 0.1\nfused: ", fused ? "true" : "false", "\n"),
        "optim.yaml");
    auto opt = optimizers_registry().create("adamw", "optim.kind", c, **m);
    return std::make_pair(m, std::move(opt));
  };
  auto [ma, oa] = make(true);
  auto [mb, ob] = make(false);
  for (int s = 0; s < 4; ++s) {
    auto x = torch::randn({16, 24}) * (s + 1);
    ((*ma)->forward(x).pow(2).sum() * 50).backward();
    ((*mb)->forward(x).pow(2).sum() * 50).backward();
    const double na = global_grad_norm((*ma)->parameters());
    clip_step_zero(*oa, (*ma)->parameters(), 1.0, na);
    const double nb = torch::nn::utils::clip_grad_norm_((*mb)->parameters(), 1.0);
    ob->step();
    ob->zero_grad();
    EXPECT_NEAR(na, nb, 1e-4 * nb);
    EXPECT_GT(nb, 1.0);  // the clip is active
    auto pa = (*ma)->parameters(), pb = (*mb)->parameters();
    for (size_t i = 0; i < pa.size(); ++i) {
      EXPECT_FALSE(pa[i].grad().defined());
      EXPECT_LT((pa[i] - pb[i]).abs().max().item<double>(), 1e-6) << "step " << s << " param " << i;
    }
  }
}

TEST(E2ETrain, TinyRunLossFallsAndWritesACheckpoint) {
  const std::string run = test::scratch_dir("run_falls") + "/run";
  ASSERT_EQ(train(run, {"train.steps=200"}), 0);
  auto l = losses(run);
  ASSERT_EQ(l.size(), 200u);
  // An untrained model predicts about uniformly: its ELBO is close to log V.
  EXPECT_NEAR(l[0], std::log(320.0), 0.3);
  double last = 0;
  for (int i = 180; i < 200; ++i) last += l[i] / 20;
  EXPECT_LT(last, l[0] - 1.0) << "first " << l[0] << " last " << last;
  auto m = metrics(run);
  ASSERT_TRUE(m.back().contains("val_nelbo"));
  // Below the unigram entropy: the model uses context.
  EXPECT_LT(m.back()["val_nelbo"].get<double>(), m.back()["val_unigram_entropy"].get<double>());
  EXPECT_TRUE(m.back().contains("tokens_per_s"));
  EXPECT_EQ(m.back()["tokens"].get<int64_t>(), 200 * 8 * 32);
  const std::string ckpt = resolve_checkpoint(run);
  EXPECT_EQ(fs::path(ckpt).filename(), "step_200");
  nlohmann::json s = verify_checkpoint(ckpt);
  EXPECT_EQ(s["step"], 200);
  EXPECT_EQ(s["data_cursor"], 200 * 8);
  for (const char* f : {"model.safetensors", "optimizer.pt", "recipe.yaml", "trainer_state.json",
                        "tokenizer/tokenizer.json"}) {
    EXPECT_TRUE(fs::exists(ckpt + "/" + f)) << f;
  }
}

// The per-step losses, gradient norms and routing losses of the shipped quickstart and debug
// recipes, and of the debug MoE with each router family, capacity, block routing and the block
// objective, on the built-in corpus, against tests/golden/losses/CASE.json: any change in what the
// trainer computes (noise, masking, loss, model, routing, dispatch, optimizer, schedule) shows
// here. After an intended change, regenerate with MIXDIFF_UPDATE_GOLDEN=1 and say why in the
// commit. MIXDIFF_GOLDEN_EXACT=1 demands bit-equal values (same machine and build: what a
// refactor must keep); by default BLAS kernels of another CPU may differ in the last digits.
struct GoldenCase {
  const char* name;
  const char* recipe;
  int steps;
  std::vector<std::string> sets;
};

TEST(E2ETrain, PerStepLossesMatchTheGoldenFiles) {
  const std::string d = test::scratch_dir("golden");
  const std::string golden_dir = test::source_dir() + "/tests/golden/losses";
  const bool update = std::getenv("MIXDIFF_UPDATE_GOLDEN") != nullptr;
  const bool exact = std::getenv("MIXDIFF_GOLDEN_EXACT") != nullptr;
  const std::string elbo_only = "losses=[{kind: masked_diffusion_elbo}]";
  const std::vector<GoldenCase> cases = {
      {"quickstart", "quickstart", 6, {}},
      {"quickstart_moe", "quickstart_moe", 6, {}},
      {"quickstart_bd3", "quickstart_bd3", 6, {}},
      {"debug_moe", "debug/moe", 30, {}},
      {"debug_unipool", "debug/unipool", 30, {}},
      {"debug_coe", "debug/coe", 30, {}},
      {"debug_rexmoe", "debug/rexmoe", 30, {}},
      {"debug_moe_expert_choice", "debug/moe", 12,
       {"model.moe.router={kind: expert_choice, capacity: {kind: constant, k: 2}}", elbo_only}},
      {"debug_moe_top_p", "debug/moe", 12,
       {"model.moe.router={kind: top_p, p: 0.5}", elbo_only}},
      {"debug_moe_capacity", "debug/moe", 12,
       {"model.moe.capacity_factor=1.0", "model.moe.drop_policy=position"}},
      {"debug_moe_dmoe", "debug/moe", 12,
       {"model.moe.block_routing={kind: dmoe, p: 0.5, guard: 2, block_size: 16}"}},
      {"debug_moe_block_objective", "debug/moe", 12,
       {"model.attention=block_causal", "model.block_size=16", "diffusion.objective=block",
        "diffusion.block_size=16"}},
  };
  bool prepared = false;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    ConfigNode r = ConfigNode::from_file(test::source_dir() + "/recipes/" + c.recipe + ".yaml");
    std::vector<std::string> sets = {"data.path=" + d + "/data",
                                     "train.steps=" + std::to_string(c.steps),
                                     "train.log_every=1", "train.ckpt_every=0",
                                     "eval.sequences=16", "eval.every=0"};
    sets.insert(sets.end(), c.sets.begin(), c.sets.end());
    for (const auto& o : sets) r.apply_override(o);
    if (!prepared) {
      std::ostringstream log;
      prepare_dataset(r.at("data"), /*force=*/false, log);
      prepared = true;
    }
    const std::string run = d + "/" + c.name;
    TrainerParts parts = build_trainer_parts(r);
    GenerateSettings::from(r);
    r.check_unknown_keys();
    fs::create_directories(run);
    Trainer t(std::move(parts), run, r.to_yaml());
    ASSERT_EQ(t.fit(), 0);
    nlohmann::json got = nlohmann::json::array();
    for (const auto& m : metrics(run)) {
      nlohmann::json row = {{"step", m["step"]}, {"loss", m["loss"]}, {"grad_norm", m["grad_norm"]}};
      if (m.contains("aux")) row["aux"] = m["aux"];
      got.push_back(row);
    }
    const std::string path = golden_dir + "/" + c.name + ".json";
    if (update) {
      fs::create_directories(golden_dir);
      test::write_text(path, nlohmann::json{{"recipe", c.recipe}, {"sets", c.sets}, {"steps", got}}
                                     .dump(1) + "\n");
      continue;
    }
    const nlohmann::json want = nlohmann::json::parse(test::read_text(path)).at("steps");
    ASSERT_EQ(got.size(), want.size());
    auto near = [&](double g, double w, double tol, const std::string& what) {
      if (exact) {
        EXPECT_EQ(g, w) << what;
      } else {
        EXPECT_NEAR(g, w, tol) << what;
      }
    };
    for (size_t i = 0; i < got.size(); ++i) {
      SCOPED_TRACE(testing::Message() << "step " << got[i]["step"]);
      near(got[i]["loss"].get<double>(), want[i]["loss"].get<double>(), 2e-4, "loss");
      near(got[i]["grad_norm"].get<double>(), want[i]["grad_norm"].get<double>(),
           2e-3 * want[i]["grad_norm"].get<double>(), "grad_norm");
      ASSERT_EQ(got[i].contains("aux"), want[i].contains("aux"));
      if (want[i].contains("aux")) {
        ASSERT_EQ(got[i]["aux"].size(), want[i]["aux"].size());
        for (const auto& [k, v] : want[i]["aux"].items()) {
          near(got[i]["aux"].at(k).get<double>(), v.get<double>(), 2e-4, k);
        }
      }
    }
  }
}

TEST(E2ETrain, SameSeedGivesIdenticalLosses) {
  const std::string d = test::scratch_dir("run_det");
  ASSERT_EQ(train(d + "/a", {"train.steps=12", "train.grad_accum=2"}), 0);
  ASSERT_EQ(train(d + "/b", {"train.steps=12", "train.grad_accum=2"}), 0);
  ASSERT_EQ(train(d + "/c", {"train.steps=12", "train.grad_accum=2", "seed=1"}), 0);
  EXPECT_EQ(losses(d + "/a"), losses(d + "/b"));
  EXPECT_NE(losses(d + "/a"), losses(d + "/c"));
}

TEST(E2ETrain, ResumeEqualsTheUninterruptedRun) {
  const std::string d = test::scratch_dir("run_resume");
  const std::vector<std::string> o = {"train.steps=20", "train.ckpt_every=8",
                                      "train.keep_checkpoints=0",
                                      "diffusion.random_length_prob=0.3"};
  ASSERT_EQ(train(d + "/full", o), 0);
  // A copy of the run as it was when step 8 had just been saved.
  fs::copy(d + "/full", d + "/part", fs::copy_options::recursive);
  fs::remove_all(d + "/part/checkpoints/step_16");
  fs::remove_all(d + "/part/checkpoints/step_20");
  test::write_text(d + "/part/checkpoints/latest", "step_8\n");
  ASSERT_EQ(train(d + "/part", o, d + "/part"), 0);
  const auto a = metrics(d + "/full"), b = metrics(d + "/part");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["step"], b[i]["step"]);
    EXPECT_EQ(a[i]["loss"], b[i]["loss"]) << "step " << a[i]["step"];
    EXPECT_EQ(a[i].value("val_nelbo", 0.0), b[i].value("val_nelbo", 0.0));
  }
  // Bitwise-equal weights at the end.
  auto wa = test::read_text(d + "/full/checkpoints/step_20/model.safetensors");
  auto wb = test::read_text(d + "/part/checkpoints/step_20/model.safetensors");
  EXPECT_TRUE(wa == wb);
}

TEST(E2ETrain, DamagedCheckpointIsRefusedWithItsFileName) {
  const std::string run = test::scratch_dir("run_damage") + "/run";
  ASSERT_EQ(train(run, {"train.steps=2"}), 0);
  const std::string ckpt = resolve_checkpoint(run);
  const std::string w = ckpt + "/model.safetensors";
  std::string raw = test::read_text(w);
  raw[raw.size() / 2] ^= 0x5a;
  test::write_text(w, raw);
  try {
    verify_checkpoint(ckpt);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors: content fingerprint mismatch"),
              std::string::npos) << e.what();
  }
  raw.resize(raw.size() - 100);
  test::write_text(w, raw);
  EXPECT_THROW(verify_checkpoint(ckpt), CheckpointError);
  test::write_text(ckpt + "/trainer_state.json", "{\"format_version\": 1, \"step\":");
  try {
    verify_checkpoint(ckpt);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("trainer_state.json: corrupt trainer state"),
              std::string::npos) << e.what();
  }
  EXPECT_THROW(resolve_checkpoint(run + "/nothing_here"), CheckpointError);
}

// A tiny MoE version of the tiny recipe: one dense block, then an MoE block with a shared expert,
// a sigmoid router with the aux-free bias, global-batch LBL and z-loss.
std::vector<std::string> moe_overrides(std::vector<std::string> more = {}) {
  std::vector<std::string> o = {
      "model.kind=moe_dlm",
      "model.moe={n_expert: 4, d_expert: 16, n_shared: 1, first_k_dense: 1, router: {kind: "
      "token_choice, top_k: 2, score: sigmoid, balancer: {kind: aux_free, rate: 0.01}}}",
      "losses=[{kind: masked_diffusion_elbo}, {kind: load_balance, scope: global, weight: 0.01}, "
      "{kind: z_loss, weight: 0.001}]"};
  o.insert(o.end(), more.begin(), more.end());
  return o;
}

TEST(E2EMoe, TinyMoeRunLogsAuxLossesAndTelemetryAndLearns) {
  const std::string run = test::scratch_dir("moe_run") + "/run";
  ASSERT_EQ(train(run, moe_overrides({"train.steps=60", "train.grad_accum=2", "train.log_every=20"})), 0);
  auto m = metrics(run);
  ASSERT_EQ(m.size(), 3u);
  EXPECT_LT(m.back()["loss"].get<double>(), m.front()["loss"].get<double>());
  EXPECT_LT(m.back()["val_nelbo"].get<double>(), m.back()["val_unigram_entropy"].get<double>());
  for (const auto& j : m) {
    ASSERT_TRUE(j.contains("aux")) << j.dump();
    EXPECT_GT(j["aux"]["load_balance"].get<double>(), 0.9);  // 1 = balanced, per layer
    EXPECT_GT(j["aux"]["z_loss"].get<double>(), 0.0);
    ASSERT_TRUE(j.contains("moe"));
    ASSERT_EQ(j["moe"]["layers"].size(), 1u);  // block 0 is dense
    const auto& l = j["moe"]["layers"][0];
    EXPECT_EQ(l["layer"], 1);
    double routed = 0;
    for (double c : l["tokens_per_expert"].get<std::vector<double>>()) routed += c;
    // 20 steps x 2 micro-batches x 8 sequences x 32 tokens, top-2 (random-length off).
    EXPECT_EQ(routed, 20.0 * 2 * 8 * 32 * 2);
    EXPECT_EQ(l["by_mask_ratio"].size(), 4u);
    for (const char* k : {"max_mean", "cv", "dead", "entropy", "dropped", "experts_per_token"}) {
      EXPECT_TRUE(l.contains(k)) << k;
    }
  }
  // The balancer's bias is part of the checkpoint.
  std::map<std::string, std::string> meta;
  auto t = load_safetensors(resolve_checkpoint(run) + "/model.safetensors", &meta);
  ASSERT_TRUE(t.count("layers.1.ffn.router.balancer.bias"));
  ASSERT_TRUE(t.count("layers.1.ffn.router.balancer.updates"));
  EXPECT_EQ(t["layers.1.ffn.router.balancer.updates"].item<double>(), 60.0);  // once per step
  EXPECT_TRUE(t.count("layers.1.ffn.experts.w_gate"));
  EXPECT_EQ(t["layers.1.ffn.experts.w_gate"].sizes(), (std::vector<int64_t>{4, 16, 32}));
}

TEST(E2EMoe, TopPActiveParametersAndFlopsUseTheMeasuredExpertsPerToken) {
  const std::string run = test::scratch_dir("topp_run") + "/run";
  ASSERT_EQ(train(run, {"model.kind=moe_dlm",
                        "model.moe={n_expert: 8, d_expert: 16, first_k_dense: 1, router: {kind: "
                        "top_p, p: 0.5}}",
                        "train.steps=8", "train.log_every=4"}),
            0);
  auto info = nlohmann::json::parse(test::read_text(run + "/run.json"));
  ASSERT_TRUE(info.contains("experts_per_token")) << info.dump();
  const double k = info["experts_per_token"][0].get<double>();
  // The run's mean of the logged intervals, weighted by their tokens.
  double kept = 0, tokens = 0;
  for (const auto& j : metrics(run)) {
    if (!j.contains("moe")) continue;
    const auto& l = j["moe"]["layers"][0];
    kept += l["experts_per_token"].get<double>() * l["tokens"].get<double>();
    tokens += l["tokens"].get<double>();
  }
  EXPECT_NEAR(k, kept / tokens, 1e-9);
  EXPECT_GT(k, 1.0);
  EXPECT_LT(k, 8.0);
  // One MoE block of 8 experts of 3 x 32 x 16 weights: k of them count per token, not max_k.
  const int64_t expert = 3 * 32 * 16, total = info["parameters"].get<int64_t>();
  EXPECT_EQ(info["active_parameters"].get<int64_t>(), total - 8 * expert + std::llround(k * expert));
  EXPECT_EQ(info["active_parameters_planned"].get<int64_t>(), total);  // max_k = 8: all of them
  EXPECT_TRUE(info["experts_per_token_data_dependent"].get<bool>());
  EXPECT_NEAR(info["train_flops_per_token_planned"].get<double>() -
                  info["train_flops_per_token"].get<double>(),
              6.0 * (8 - k) * expert, 1e-6 * info["train_flops_per_token"].get<double>());
}

TEST(E2EMoe, BlockDiffusionRoutingTelemetryReadsTheNoisyHalfsMaskRatio) {
  // BD3 trains on [x_t ; x_0]; the clean half never holds [MASK], so a mask ratio over the whole
  // input could never exceed 0.5. Over the noisy half it does.
  const std::string run = test::scratch_dir("bd3_moe") + "/run";
  ASSERT_EQ(train(run, {"model.kind=moe_dlm", "model.attention=block_causal", "model.block_size=8",
                        "model.moe={n_expert: 4, d_expert: 16, router: {kind: token_choice, top_k: 2}}",
                        "diffusion.objective=block", "diffusion.block_size=8", "train.steps=6",
                        "train.log_every=6"}),
            0);
  auto m = metrics(run);
  ASSERT_TRUE(m.back().contains("moe"));
  const auto& buckets = m.back()["moe"]["layers"][0]["by_mask_ratio"];
  ASSERT_EQ(buckets.size(), 4u);
  EXPECT_GT(buckets[2]["tokens"].get<double>() + buckets[3]["tokens"].get<double>(), 0.0)
      << buckets.dump();
}

TEST(E2EMoe, MoeResumeEqualsTheUninterruptedRun) {
  const std::string d = test::scratch_dir("moe_resume");
  const auto o = moe_overrides({"train.steps=12", "train.ckpt_every=6", "train.keep_checkpoints=0",
                                "train.grad_accum=2",
                                "losses=[{kind: masked_diffusion_elbo}, {kind: load_balance, "
                                "scope: global, weight: 0.01}, {kind: erc, weight: 0.1}]"});
  ASSERT_EQ(train(d + "/full", o), 0);
  fs::copy(d + "/full", d + "/part", fs::copy_options::recursive);
  fs::remove_all(d + "/part/checkpoints/step_12");
  test::write_text(d + "/part/checkpoints/latest", "step_6\n");
  ASSERT_EQ(train(d + "/part", o, d + "/part"), 0);
  const auto a = metrics(d + "/full"), b = metrics(d + "/part");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["loss"], b[i]["loss"]) << "step " << a[i]["step"];
    EXPECT_EQ(a[i]["aux"], b[i]["aux"]) << "step " << a[i]["step"];
  }
  EXPECT_TRUE(test::read_text(d + "/full/checkpoints/step_12/model.safetensors") ==
              test::read_text(d + "/part/checkpoints/step_12/model.safetensors"));
}

// The trainer with activation checkpointing (every block recomputed, capacity drops, ERC,
// global-batch LBL, the aux-free bias, gradient accumulation and the fused AdamW) logs the losses
// and writes the weights of the run that keeps its activations.
TEST(E2EMoe, ActivationCheckpointingRunEqualsTheRunThatKeepsActivations) {
  const std::string d = test::scratch_dir("moe_ac");
  auto sets = [](const std::string& mode) {
    return moe_overrides({"train.steps=6", "train.grad_accum=2", "train.log_every=1",
                          "model.moe.capacity_factor=1.0",
                          "losses=[{kind: masked_diffusion_elbo}, {kind: load_balance, scope: "
                          "global, weight: 0.01}, {kind: erc, weight: 0.1}]",
                          "train.activation_checkpointing=" + mode});
  };
  ASSERT_EQ(train(d + "/none", sets("none")), 0);
  ASSERT_EQ(train(d + "/blocks", sets("blocks")), 0);
  const auto a = losses(d + "/none"), b = losses(d + "/blocks");
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-6) << "step " << i + 1;
  auto wa = load_safetensors(resolve_checkpoint(d + "/none") + "/model.safetensors");
  auto wb = load_safetensors(resolve_checkpoint(d + "/blocks") + "/model.safetensors");
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [name, t] : wa) {
    ASSERT_TRUE(wb.count(name)) << name;
    EXPECT_LE((t - wb.at(name)).abs().max().item<double>(), 1e-6) << name;
  }
}

TEST(E2EMoe, ZLossWithNormRouterIsRefused) {
  const std::string d = test::scratch_dir("moe_zloss_norm");
  test::write_text(d + "/r.yaml", test::tiny_recipe(data_dir()));
  ConfigNode r = ConfigNode::from_file(d + "/r.yaml");
  r.apply_override("model={kind: unipool_dlm, d_model: 32, n_layer: 2, n_head: 2, d_ff: 64, "
                   "max_seq_len: 64, moe: {n_expert: 4, d_expert: 16, router: {kind: norm_router, "
                   "top_k: 2}}}");
  r.apply_override("losses=[{kind: masked_diffusion_elbo}, {kind: z_loss, weight: 0.001}]");
  try {
    build_trainer_parts(r);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("losses.1.kind"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("norm_router"), std::string::npos) << e.what();
  }
}

TEST(E2EMoe, RoutingLossOnADenseModelIsRefused) {
  const std::string d = test::scratch_dir("moe_dense_refused");
  test::write_text(d + "/r.yaml", test::tiny_recipe(data_dir()));
  ConfigNode r = ConfigNode::from_file(d + "/r.yaml");
  r.apply_override("losses=[{kind: masked_diffusion_elbo}, {kind: load_balance}]");
  try {
    build_trainer_parts(r);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("losses.1.kind"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("has no MoE layers"), std::string::npos) << e.what();
  }
}

TEST(RoundtripRecipe, ResolvedRecipeRebuildsToTheSameRecipe) {
  const std::string d = test::scratch_dir("recipe_rt");
  test::write_text(d + "/r.yaml", test::tiny_recipe(data_dir()));
  auto resolve = [](ConfigNode r) {
    build_trainer_parts(r);
    GenerateSettings::from(r);
    r.check_unknown_keys();
    return r.to_yaml();
  };
  ConfigNode r1 = ConfigNode::from_file(d + "/r.yaml");
  r1.apply_override("model.qk_norm=true");
  const std::string y1 = resolve(r1);
  EXPECT_NE(y1.find("n_kv_head: 2"), std::string::npos) << y1;   // defaults are written out
  EXPECT_NE(y1.find("vocab_size: 320"), std::string::npos) << y1;  // derived from the data
  EXPECT_NE(y1.find("qk_norm: true"), std::string::npos) << y1;    // overrides are kept
  const std::string y2 = resolve(ConfigNode::from_string(y1, "resolved.yaml"));
  EXPECT_EQ(y1, y2);
}

}  // namespace
}  // namespace mixdiff
