// Activation checkpointing (train.activation_checkpointing, nn/checkpoint.h): a recomputed block
// or feed-forward gives the losses and every gradient of the run that keeps its activations, for
// dense and MoE models whose routing has state, noise and drops; and the routing state is
// updated once per forward, not again by the recomputation.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/errors.h"
#include "moe/moe_layer.h"
#include "nn/checkpoint.h"
#include "support/support.h"
#include "train/trainer.h"

namespace mixdiff {
namespace {

// What a few optimizer steps of a recipe produced, micro-batch by micro-batch.
struct Trace {
  std::vector<double> losses;                           // per micro-batch
  std::vector<std::map<std::string, at::Tensor>> grads; // accumulated, after each micro-batch
  std::vector<std::vector<double>> aux;                 // per step and MoE layer, every term
  std::vector<std::vector<double>> global_counts;       // per step, every MoE layer's counts
  std::map<std::string, at::Tensor> state;              // parameters and buffers at the end
};

// Runs `steps` optimizer steps of `micro` micro-batches of the tiny recipe with `sets`: the
// trainer's micro-batch loop (noise from a per-(step, micro) generator, the diffusion losses,
// backward scaled by 1 / micro), then the MoE layers' step_end and a plain SGD update, so that the
// next step routes with other weights and balancer state.
Trace run(const std::vector<std::string>& sets, int64_t steps = 2, int64_t micro = 2) {
  const std::string& dir = test::tiny_dir("checkpointing");
  ConfigNode r = ConfigNode::from_file(dir + "/recipe.yaml");
  r.apply_override("model.n_layer=3");
  for (const auto& s : sets) r.apply_override(s);
  TrainerParts p = build_trainer_parts(r);
  auto& model = *p.model;
  model.train();
  const auto moe = model.moe_layers();
  for (MoeLayer* l : moe) l->set_aux_scale(1.0 / static_cast<double>(micro));
  Trace t;
  int64_t cursor = 0;
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t m = 0; m < micro; ++m) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(1000 * step + m + 7));
      auto x0 = p.data->train_batch(cursor, p.options.batch_size);
      cursor += p.options.batch_size;
      DiffusionBatch batch = p.options.objective->noise(x0, *p.schedule, model.mask_id(), gen, 1, 0);
      ModelInput in = p.options.objective->input(batch, x0);
      in.step = step;
      in.micro = m;
      ModelOutput out = model.forward(in);
      at::Tensor total;
      for (auto& l : p.losses) {
        if (l.routing) continue;
        auto v = l.term->compute(out, batch) * l.weight;
        total = total.defined() ? total + v : v;
      }
      (total / static_cast<double>(micro)).backward();
      t.losses.push_back(total.item<double>());
      std::map<std::string, at::Tensor> g;
      for (const auto& kv : model.named_parameters()) {
        if (kv.value().grad().defined()) g[kv.key()] = kv.value().grad().clone();
      }
      t.grads.push_back(std::move(g));
    }
    std::vector<double> aux, counts;
    for (MoeLayer* l : moe) {
      for (double v : l->take_aux_values()) aux.push_back(v);
      const auto& c = l->global_load().counts_S;
      if (c.defined()) {
        auto cc = c.to(torch::kFloat64).contiguous();
        counts.insert(counts.end(), cc.data_ptr<double>(), cc.data_ptr<double>() + cc.numel());
      }
      l->step_end({});
    }
    t.aux.push_back(aux);
    t.global_counts.push_back(counts);
    torch::NoGradGuard ng;
    for (auto& w : model.parameters()) {
      if (w.grad().defined()) {
        w.sub_(w.grad() * 0.5);
        w.mutable_grad() = at::Tensor();
      }
    }
  }
  for (const auto& kv : model.named_parameters()) t.state["param " + kv.key()] = kv.value().clone();
  for (const auto& kv : model.named_buffers()) t.state["buffer " + kv.key()] = kv.value().clone();
  return t;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

void expect_same(const Trace& a, const Trace& b, double tol = 1e-6) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) {
    EXPECT_NEAR(a.losses[i], b.losses[i], tol) << "micro-batch " << i;
    ASSERT_EQ(a.grads[i].size(), b.grads[i].size()) << "micro-batch " << i;
    for (const auto& [name, g] : a.grads[i]) {
      ASSERT_TRUE(b.grads[i].count(name)) << name;
      EXPECT_LE(max_diff(g, b.grads[i].at(name)), tol) << "micro-batch " << i << ": " << name;
    }
  }
  ASSERT_EQ(a.aux.size(), b.aux.size());
  for (size_t s = 0; s < a.aux.size(); ++s) {
    ASSERT_EQ(a.aux[s].size(), b.aux[s].size());
    for (size_t i = 0; i < a.aux[s].size(); ++i) EXPECT_NEAR(a.aux[s][i], b.aux[s][i], tol);
    // Counted once per forward: a recomputation that counted again would double them.
    ASSERT_EQ(a.global_counts[s].size(), b.global_counts[s].size());
    for (size_t i = 0; i < a.global_counts[s].size(); ++i) {
      EXPECT_EQ(a.global_counts[s][i], b.global_counts[s][i]) << "step " << s << " count " << i;
    }
  }
  ASSERT_EQ(a.state.size(), b.state.size());
  for (const auto& [name, v] : a.state) {
    ASSERT_TRUE(b.state.count(name)) << name;
    EXPECT_LE(max_diff(v, b.state.at(name)), tol) << name;
  }
}

struct Case {
  std::string name;
  std::vector<std::string> sets;
  std::vector<std::string> modes;
};

const std::string kElbo = "{kind: masked_diffusion_elbo}";

std::vector<Case> cases() {
  return {
      {"dense", {}, {"blocks", "every_k"}},
      // Token choice with a sigmoid router and the aux-loss-free bias, capacity 0.75 (drops are
      // certain) by gate, global-batch LBL, z-loss and ERC's noise.
      {"token_choice_erc_capacity",
       {"model.kind=moe_dlm",
        "model.moe={n_expert: 4, d_expert: 16, n_shared: 1, first_k_dense: 1, capacity_factor: "
        "0.75, drop_policy: probability, router: {kind: token_choice, top_k: 2, score: sigmoid, "
        "balancer: {kind: aux_free, rate: 0.01}}}",
        "losses=[" + kElbo + ", {kind: load_balance, scope: global, weight: 0.01}, {kind: z_loss, "
        "weight: 0.001}, {kind: erc, weight: 0.1}]"},
       {"blocks", "moe", "every_k"}},
      // BIP adapts its dual prices inside the training forward: once, in the first forward.
      {"bip",
       {"model.kind=moe_dlm",
        "model.moe={n_expert: 4, d_expert: 16, capacity_factor: 1.0, drop_policy: position, "
        "router: {kind: token_choice, top_k: 2, score: sigmoid, balancer: {kind: bip, iters: 2}}}",
        "losses=[" + kElbo + ", {kind: load_balance, scope: micro, weight: 0.01}]"},
       {"blocks", "moe"}},
      {"expert_choice",
       {"model.kind=moe_dlm",
        "model.moe={n_expert: 4, d_expert: 16, router: {kind: expert_choice, capacity: {kind: "
        "linear, k_min: 1, k_max: 3}}}",
        "losses=[" + kElbo + ", {kind: z_loss, weight: 0.001}]"},
       {"blocks", "moe", "every_k"}},
      {"chain_of_experts",
       {"model.kind=coe_dlm",
        "model.moe={n_expert: 4, d_expert: 16, n_shared: 1, iterations: 2, residual: paper, "
        "router: {kind: token_choice, top_k: 2}}",
        "losses=[" + kElbo + ", {kind: load_balance, scope: sequence, weight: 0.01}]"},
       {"blocks", "moe"}},
      // A pool shared by every layer, with UniPool's one-step-behind pool loss (state updated by
      // the loss itself, which a checkpointed layer computes in its recomputation).
      {"unipool",
       {"model.kind=unipool_dlm",
        "model.moe={n_expert: 4, d_expert: 16, router: {kind: norm_router, top_k: 2}}",
        "losses=[" + kElbo + ", {kind: pool_balance, weight: 0.01}]"},
       {"blocks", "moe", "every_k"}},
  };
}

TEST(ComponentActivationCheckpointing, LossesAndEveryGradientEqualTheRunThatKeepsActivations) {
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    const Trace keep = run(c.sets);
    for (const auto& mode : c.modes) {
      SCOPED_TRACE(mode);
      auto sets = c.sets;
      sets.push_back("train.activation_checkpointing=" + mode);
      // Equal results from a run that silently kept its activations would prove nothing: the
      // regions must have been recomputed (3 layers x 2 steps x 2 micro-batches; every_k = 2
      // checkpoints only block 1).
      const int64_t before = regions_recomputed();
      expect_same(keep, run(sets));
      const int64_t expected_min = mode == "every_k" ? 4 : 8;
      EXPECT_GE(regions_recomputed() - before, expected_min);
    }
  }
}

// Capacity drops are replayed, not decided again: with the global bound of two ranks (a gather
// inside the first forward), a recomputation that asked the other rank again would hang or
// drop otherwise; here one process checks that the recomputation calls no capacity bound at all
// by giving the layer a rank scope whose gather fails after the first forward.
TEST(ComponentActivationCheckpointing, RecomputationReplaysCapacityDropsWithoutCollectives) {
  const std::string& dir = test::tiny_dir("checkpointing");
  ConfigNode r = ConfigNode::from_file(dir + "/recipe.yaml");
  r.apply_override("model.kind=moe_dlm");
  r.apply_override("model.moe={n_expert: 4, d_expert: 16, capacity_factor: 0.75, router: {kind: "
                   "token_choice, top_k: 2}}");
  r.apply_override("train.activation_checkpointing=blocks");
  TrainerParts p = build_trainer_parts(r);
  auto& model = *p.model;
  model.train();
  int gathers = 0;
  bool backward_started = false;
  for (MoeLayer* l : model.moe_layers()) {
    RankScope s;
    s.world = 2;
    s.rank = 0;
    // A stand-in for a second rank with the same tokens: the global bound sees both.
    s.gather = [&](const at::Tensor& t) {
      EXPECT_FALSE(backward_started) << "a capacity collective inside the recomputation";
      ++gathers;
      return torch::cat({t, t});
    };
    l->set_rank_scope(s);
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  auto x0 = p.data->train_batch(0, p.options.batch_size);
  DiffusionBatch batch = p.options.objective->noise(x0, *p.schedule, model.mask_id(), gen, 1, 0);
  ModelInput in = p.options.objective->input(batch, x0);
  ModelOutput out = model.forward(in);
  const int forward_gathers = gathers;
  EXPECT_EQ(forward_gathers, 2 * static_cast<int>(model.moe_layers().size()));
  backward_started = true;
  p.losses[0].term->compute(out, batch).backward();
  EXPECT_EQ(gathers, forward_gathers);
}

TEST(UnitActivationCheckpointing, BadSettingsAreRefusedWithTheirKey) {
  const std::string& dir = test::tiny_dir("checkpointing");
  auto refuse = [&](const std::vector<std::string>& sets, const std::string& key,
                    const std::string& words) {
    ConfigNode r = ConfigNode::from_file(dir + "/recipe.yaml");
    for (const auto& s : sets) r.apply_override(s);
    try {
      build_trainer_parts(r);
      ADD_FAILURE() << "accepted " << sets.back();
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  refuse({"train.activation_checkpointing=all"}, "train.activation_checkpointing", "every_k");
  refuse({"train.activation_checkpointing=moe"}, "train.activation_checkpointing", "has none");
  refuse({"train.activation_checkpointing=every_k", "train.activation_checkpointing_every=0"},
         "train.activation_checkpointing_every", "positive");
  refuse({"train.activation_checkpointing=every_k", "train.activation_checkpointing_every=5"},
         "train.activation_checkpointing", "1..n_layer");
}

}  // namespace
}  // namespace mixdiff
