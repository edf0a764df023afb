// MoE layer, routers and balancers: the fast dispatch against its loop twin, the degenerate
// cases that must equal a dense FFN, and the properties the router and balancing papers state.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <set>

#include "core/config.h"
#include "core/errors.h"
#include "moe/dispatcher.h"
#include "moe/experts.h"
#include "moe/moe_layer.h"
#include "moe/observers.h"
#include "moe/router.h"
#include "nn/layers.h"

namespace mixdiff {

// losses/erc.cpp: the hinge of the ERC loss on an activation matrix.
at::Tensor erc_hinge(const at::Tensor& M, double alpha);

namespace {

std::shared_ptr<RouterBase> make_router(const std::string& yaml, int64_t d_model, int64_t n_expert) {
  ConfigNode c = ConfigNode::from_string(yaml, "router.yaml");
  auto r = routers_registry().create(c.get<std::string>("kind"), "kind", c, RouterDims{d_model, n_expert});
  c.check_unknown_keys();
  return r;
}

std::shared_ptr<MoeLayer> make_layer(const std::string& moe_yaml, const std::string& router_yaml,
                                     int64_t d_model) {
  ConfigNode c = ConfigNode::from_string(moe_yaml, "moe.yaml");
  MoeOptions o = MoeOptions::from(c, d_model);
  auto layer = std::make_shared<MoeLayer>(o, make_router(router_yaml, d_model, o.n_expert));
  torch::NoGradGuard ng;
  for (auto& p : layer->parameters()) p.normal_(0.0, 0.2);
  return layer;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(ComponentMoe, SortedDispatchMatchesTheLoopReference) {
  torch::manual_seed(0);
  const int64_t D = 12, F = 10;
  for (int64_t T : {1, 7, 64}) {
    for (int64_t E : {1, 4, 16}) {
      for (int64_t K : {1, 2, 4}) {
        if (K > E) continue;
        SCOPED_TRACE(testing::Message() << "T=" << T << " E=" << E << " K=" << K);
        ExpertPool pool(E, D, F);
        for (auto& p : pool.parameters()) {
          torch::NoGradGuard ng;
          p.normal_(0.0, 0.3);
        }
        auto x = torch::randn({T, D}, torch::requires_grad());
        auto logits = torch::randn({T, E});
        auto idx = topk_indices(logits, K);
        auto gate_TK = torch::rand({T, K}).requires_grad_(true);
        auto token = torch::arange(T).unsqueeze(1).expand({T, K}).reshape({-1});
        auto expert = idx.reshape({-1});
        auto run = [&](const std::string& d) {
          for (auto& p : pool.parameters()) p.mutable_grad() = at::Tensor();
          x.mutable_grad() = at::Tensor();
          gate_TK.mutable_grad() = at::Tensor();
          auto y = pool.forward(x, token, expert, gate_TK.reshape({-1}), *make_dispatcher(d));
          auto w = torch::linspace(-1, 1, T * D).view({T, D});
          (y * w).sum().backward();
          std::vector<at::Tensor> out{y.detach(), x.grad().clone(), gate_TK.grad().clone()};
          for (auto& p : pool.parameters()) out.push_back(p.grad().clone());
          return out;
        };
        auto fast = run("sorted"), ref = run("loop");
        ASSERT_EQ(fast.size(), ref.size());
        for (size_t i = 0; i < fast.size(); ++i) {
          EXPECT_LT(max_diff(fast[i], ref[i]), 1e-5) << "tensor " << i;
        }
      }
    }
  }
}

TEST(ComponentMoe, OneExpertMoeEqualsTheDenseSwiGLU) {
  torch::manual_seed(1);
  auto layer = make_layer("{n_expert: 1, d_expert: 24}", "{kind: token_choice, top_k: 1}", 16);
  SwiGLU dense(16, 24);
  {
    torch::NoGradGuard ng;
    auto dp = dense.named_parameters();
    dp["w_gate"].copy_(layer->pool().w_gate()[0]);
    dp["w_up"].copy_(layer->pool().w_up()[0]);
    dp["w_down"].copy_(layer->pool().w_down()[0]);
  }
  auto x = torch::randn({2, 5, 16});
  EXPECT_LT(max_diff(layer->forward(x, nullptr), dense.forward(x)), 1e-6);
}

TEST(ComponentMoe, SharedExpertIsAddedToTheRoutedOutput) {
  torch::manual_seed(2);
  auto with = make_layer("{n_expert: 4, d_expert: 8, n_shared: 1}", "{kind: token_choice, top_k: 2}", 16);
  auto x = torch::randn({3, 4, 16});
  auto named = with->named_parameters();
  SwiGLU shared(16, 8);
  {
    torch::NoGradGuard ng;
    auto sp = shared.named_parameters();
    for (const char* n : {"w_gate", "w_up", "w_down"}) sp[n].copy_(named[std::string("shared.") + n]);
  }
  with->eval();
  auto y = with->forward(x, nullptr);
  RoutingDecision d = with->router().route(x.reshape({12, 16}), RoutingContext{});
  auto routed = with->pool().forward(x.reshape({12, 16}), d.token_A, d.expert_A, d.gate_A,
                                     *make_dispatcher("loop"));
  EXPECT_LT(max_diff(y.reshape({12, 16}), routed + shared.forward(x.reshape({12, 16}))), 1e-5);
}

TEST(ComponentMoe, DroplessEqualsCapacityWhenNothingDrops) {
  torch::manual_seed(3);
  auto a = make_layer("{n_expert: 8, d_expert: 8}", "{kind: token_choice, top_k: 2}", 16);
  auto b = make_layer("{n_expert: 8, d_expert: 8, capacity_factor: 8.0}",
                      "{kind: token_choice, top_k: 2}", 16);
  {
    torch::NoGradGuard ng;
    auto pa = a->named_parameters(), pb = b->named_parameters();
    for (auto& kv : pa) pb[kv.key()].copy_(kv.value());
  }
  auto x = torch::randn({4, 8, 16});
  EXPECT_LT(max_diff(a->forward(x, nullptr), b->forward(x, nullptr)), 1e-6);
  // A tight capacity drops assignments and changes the output.
  auto c = make_layer("{n_expert: 8, d_expert: 8, capacity_factor: 0.25}",
                      "{kind: token_choice, top_k: 2}", 16);
  {
    torch::NoGradGuard ng;
    auto pa = a->named_parameters(), pc = c->named_parameters();
    for (auto& kv : pa) pc[kv.key()].copy_(kv.value());
  }
  EXPECT_GT(max_diff(a->forward(x, nullptr), c->forward(x, nullptr)), 1e-4);
}

TEST(UnitRouter, RenormalisedTopKGatesSumToTheScalingFactor) {
  torch::manual_seed(4);
  for (const char* score : {"softmax", "sigmoid"}) {
    auto r = make_router(std::string("{kind: token_choice, top_k: 3, score: ") + score +
                             ", normalize: true, scaling: 2.5}",
                         16, 8);
    auto d = r->route(torch::randn({20, 16}), RoutingContext{});
    auto sums = torch::zeros({20}).index_add(0, d.token_A, d.gate_A);
    EXPECT_LT(max_diff(sums, torch::full({20}, 2.5)), 1e-5) << score;
    EXPECT_EQ(d.token_A.numel(), 60);
    // Probabilities seen by the losses are a distribution per token.
    EXPECT_LT(max_diff(d.probs_TS.sum(1), torch::ones({20})), 1e-5);
  }
  // Softmax after top-k (Mixtral) equals softmax before top-k with renormalisation.
  torch::manual_seed(5);
  auto a = make_router("{kind: token_choice, top_k: 2, softmax: after_topk}", 16, 8);
  torch::manual_seed(5);
  auto b = make_router("{kind: token_choice, top_k: 2, normalize: true}", 16, 8);
  auto x = torch::randn({10, 16});
  auto da = a->route(x, {}), db = b->route(x, {});
  EXPECT_TRUE(torch::equal(da.expert_A, db.expert_A));
  EXPECT_LT(max_diff(da.gate_A, db.gate_A), 1e-6);
}

TEST(UnitRouter, TiesGoToTheLowerExpertIndex) {
  auto r = make_router("{kind: token_choice, top_k: 3}", 8, 6);
  {
    torch::NoGradGuard ng;
    for (auto& p : r->parameters()) p.zero_();
  }
  auto d = r->route(torch::randn({4, 8}), {});
  EXPECT_TRUE(torch::equal(d.expert_A.view({4, 3}),
                           torch::tensor({0, 1, 2}, torch::kLong).expand({4, 3})));
}

TEST(UnitRouter, GroupLimitedRoutingNeverLeavesTheChosenGroups) {
  torch::manual_seed(6);
  const int64_t E = 16, G = 4, per = 4, keep = 2, K = 4, T = 200;
  auto r = make_router("{kind: token_choice, top_k: 4, score: sigmoid, n_group: 4, topk_group: 2}",
                       16, E);
  auto x = torch::randn({T, 16});
  auto d = r->route(x, {});
  auto scores = torch::sigmoid(d.logits_TS).view({T, G, per});
  auto gscore = std::get<0>(scores.topk(2, -1)).sum(-1);  // top-2 sum per group
  auto best = std::get<1>(gscore.topk(keep, -1));
  auto e = d.expert_A.view({T, K});
  for (int64_t t = 0; t < T; ++t) {
    std::set<int64_t> groups{best[t][0].item<int64_t>(), best[t][1].item<int64_t>()};
    for (int64_t k = 0; k < K; ++k) {
      EXPECT_TRUE(groups.count(e[t][k].item<int64_t>() / per)) << "token " << t;
    }
  }
  // Without the group limit some tokens do leave those groups (the test is not vacuous).
  auto free = make_router("{kind: token_choice, top_k: 4, score: sigmoid}", 16, E);
  {
    torch::NoGradGuard ng;
    free->parameters()[0].copy_(r->parameters()[0]);
  }
  auto f = free->route(x, {}).expert_A.view({T, K});
  EXPECT_FALSE(torch::equal(f, e));
}

TEST(UnitRouter, TopPKeepsExpertsUntilTheMassReachesP) {
  auto r = make_router("{kind: top_p, p: 0.5}", 4, 4);
  {
    torch::NoGradGuard ng;
    r->parameters()[0].copy_(torch::eye(4));
  }
  // Token 0: one dominant expert; token 1: flat scores take several.
  auto x = torch::tensor({{5.0, 0.0, 0.0, 0.0}, {0.1, 0.0, 0.05, 0.02}});
  auto d = r->route(x, {});
  auto p = torch::softmax(x, -1);
  EXPECT_EQ((d.token_A == 0).sum().item<int64_t>(), 1);
  EXPECT_EQ((d.token_A == 1).sum().item<int64_t>(), 2);  // 0.27 + 0.25 crosses 0.5
  for (int64_t a = 0; a < d.token_A.numel(); ++a) {      // raw probabilities as gates
    EXPECT_NEAR(d.gate_A[a].item<double>(),
                p[d.token_A[a].item<int64_t>()][d.expert_A[a].item<int64_t>()].item<double>(), 1e-6);
  }
}

TEST(UnitRouter, NullExpertsTakeSlotsButNoAssignments) {
  torch::manual_seed(7);
  auto r = make_router("{kind: token_choice, top_k: 2, n_null: 4}", 8, 4);
  auto d = r->route(torch::randn({100, 8}), {});
  EXPECT_EQ(d.probs_TS.size(1), 8);
  EXPECT_TRUE((d.expert_A < 4).all().item<bool>());
  EXPECT_LT(d.token_A.numel(), 200);  // some tokens chose null slots
  EXPECT_EQ(d.lb_map_TS.sum().item<double>(), 200.0);  // losses count every slot
}

// A router whose expert e gets a constant logit advantage skew * e: without balancing the last
// experts take most tokens.
at::Tensor skewed_inputs(int64_t T, int64_t D) {
  auto x = torch::randn({T, D});
  x.select(1, 0).fill_(1.0);
  return x;
}

void skew(RouterBase& r, int64_t E, double amount) {
  torch::NoGradGuard ng;
  auto w = r.named_parameters()["weight"];
  w.normal_(0.0, 0.1);
  w.select(1, 0).copy_(torch::linspace(0, amount, E));
}

double max_over_mean(const RoutingDecision& d, int64_t E) {
  auto c = torch::bincount(d.expert_A, {}, E).to(torch::kDouble);
  return (c.max() / c.mean()).item<double>();
}

TEST(ComponentBalance, AuxFreeBiasBalancesASkewedRouterAndLeavesGatesUnbiased) {
  torch::manual_seed(8);
  const int64_t E = 8, D = 16, T = 1024;
  auto r = make_router("{kind: token_choice, top_k: 2, score: sigmoid, balancer: {kind: aux_free, rate: 0.001}}",
                       D, E);
  skew(*r, E, 1.0);
  r->train();
  const double before = max_over_mean(r->route(skewed_inputs(T, D), {}), E);
  EXPECT_GT(before, 2.0);
  // ALF-LB moves each bias by `rate` per step; the skew here is worth ~0.1 of sigmoid score,
  // i.e. ~100 steps (the paper's runs balance within the first few hundred steps).
  double after = 0;
  RoutingDecision last;
  for (int step = 0; step < 300; ++step) {
    last = r->route(skewed_inputs(T, D), {});
    r->step_end(StatReducer());
  }
  after = max_over_mean(last, E);
  EXPECT_LT(after, 1.2) << "before " << before;
  // Gates are the unbiased sigmoid scores of the chosen experts, renormalised.
  auto s = torch::sigmoid(last.logits_TS);
  auto g = s.gather(1, last.expert_A.view({T, 2}));
  EXPECT_LT(max_diff(last.gate_A.view({T, 2}), g / g.sum(1, true)), 1e-6);
  // The bias is routing state: a buffer, saved with the weights, not a parameter.
  auto buffers = r->named_buffers();
  ASSERT_TRUE(buffers.contains("balancer.bias"));
  EXPECT_GT(buffers["balancer.bias"].abs().max().item<double>(), 0.01);
  for (const auto& p : r->named_parameters()) EXPECT_EQ(p.key(), "weight");
}

TEST(ComponentBalance, BipBalancesASkewedRouterWithinTheFirstBatches) {
  torch::manual_seed(9);
  const int64_t E = 8, D = 16, T = 1024;
  auto r = make_router("{kind: token_choice, top_k: 2, balancer: {kind: bip, iters: 4}}", D, E);
  skew(*r, E, 2.0);
  r->eval();
  const double before = max_over_mean(r->route(skewed_inputs(T, D), {}), E);
  EXPECT_GT(before, 2.0);
  r->train();
  // BIP solves each batch's balanced assignment: balanced from the first training steps.
  RoutingDecision d;
  for (int step = 0; step < 3; ++step) d = r->route(skewed_inputs(T, D), {});
  EXPECT_LT(max_over_mean(d, E), 1.2) << "before " << before;
  auto p = torch::softmax(d.logits_TS, -1);
  EXPECT_LT(max_diff(d.gate_A.view({T, 2}), p.gather(1, d.expert_A.view({T, 2}))), 1e-6);
  // Evaluation routes with the learned prices without updating them.
  r->eval();
  auto dual = r->named_buffers()["balancer.dual"].clone();
  auto e = r->route(skewed_inputs(T, D), {});
  EXPECT_TRUE(torch::equal(dual, r->named_buffers()["balancer.dual"]));
  EXPECT_LT(max_over_mean(e, E), 1.3);
}

// ---- routing losses ----

std::shared_ptr<RoutingLoss> make_loss(const std::string& yaml) {
  ConfigNode c = ConfigNode::from_string(yaml, "loss.yaml");
  auto l = routing_losses_registry().create(c.get<std::string>("kind"), "kind", c);
  c.check_unknown_keys();
  return l;
}

RoutingDecision decision_from(const at::Tensor& logits, int64_t K) {
  RoutingDecision d;
  d.logits_TS = logits;
  d.probs_TS = torch::softmax(logits, -1);
  d.lb_map_TS = selection_map(topk_indices(d.probs_TS.detach(), K), logits.size(1), {});
  d.n_expert = logits.size(1);
  d.top_k = K;
  return d;
}

TEST(UnitLosses, LoadBalanceAndZLossMatchHandComputedValues) {
  // Two tokens, two experts, top-1: token 0 -> expert 0, token 1 -> expert 0.
  auto logits = torch::tensor({{2.0f, 0.0f}, {1.0f, 0.0f}});
  auto d = decision_from(logits, 1);
  ExpertPool pool(2, 2, 2);
  GlobalLoad g;
  RoutingContext ctx;
  RoutingRecord rec{d, ctx, pool, g, {}, 1};
  const double p00 = 1 / (1 + std::exp(-2.0)), p10 = 1 / (1 + std::exp(-1.0));
  // f = (1, 0), P = ((p00 + p10) / 2, ...): LBL = 2 * (p00 + p10) / 2.
  EXPECT_NEAR(make_loss("{kind: load_balance}")->layer_loss(rec).item<double>(), p00 + p10, 1e-6);
  const double z0 = std::log(std::exp(2.0) + 1), z1 = std::log(std::exp(1.0) + 1);
  EXPECT_NEAR(make_loss("{kind: z_loss}")->layer_loss(rec).item<double>(),
              (z0 * z0 + z1 * z1) / 2, 1e-5);
  // Balanced routing gives LBL = 1.
  auto bal = decision_from(torch::tensor({{1.0f, 0.0f}, {0.0f, 1.0f}}), 1);
  RoutingRecord rb{bal, ctx, pool, g, {}, 1};
  EXPECT_NEAR(make_loss("{kind: load_balance}")->layer_loss(rb).item<double>(), 1.0, 1e-6);
}

TEST(UnitLosses, PoolCardinalityTargetsTheLayersShareOfThePool) {
  // A pool of 6 experts shared by 2 layers: a layer's share is 3 experts, target H = log 3.
  ExpertPool pool(6, 2, 2);
  GlobalLoad g;
  RoutingContext ctx;
  auto decision = [](const at::Tensor& scores) {
    RoutingDecision d;
    d.scores_TS = scores;
    d.probs_TS = scores / scores.sum(-1, true);
    d.n_expert = scores.size(1);
    d.top_k = 1;
    return d;
  };
  auto value = [&](const std::string& cfg, const at::Tensor& scores, int64_t step = 0) {
    auto d = decision(scores);
    ctx.step = step;
    RoutingRecord r{d, ctx, pool, g, {}, 2};
    return make_loss(cfg)->layer_loss(r).item<double>();
  };
  const auto spread3 = torch::tensor({{1.f, 0.f, 0.f, 0.f, 0.f, 0.f},
                                      {0.f, 1.f, 0.f, 0.f, 0.f, 0.f},
                                      {0.f, 0.f, 1.f, 0.f, 0.f, 0.f}});
  const auto one = torch::tensor({{1.f, 0.f, 0.f, 0.f, 0.f, 0.f}, {2.f, 0.f, 0.f, 0.f, 0.f, 0.f}});
  const double l3 = std::log(3.0);
  EXPECT_NEAR(value("{kind: pool_cardinality}", spread3), 0.0, 1e-6);
  EXPECT_NEAR(value("{kind: pool_cardinality}", one), l3 * l3 / 2, 1e-5);  // (0 - log 3)^2 / N_L
  // Only the spread counts, not the size of the scores (the pool LBL falls with it).
  EXPECT_NEAR(value("{kind: pool_cardinality}", one * 5.0), value("{kind: pool_cardinality}", one), 1e-6);
  EXPECT_NEAR(value("{kind: pool_cardinality, target_experts: 1}", one), 0.0, 1e-6);
  EXPECT_NEAR(value("{kind: pool_cardinality, warmup_steps: 4}", one, 0), l3 * l3 / 8, 1e-5);
  EXPECT_NEAR(value("{kind: pool_cardinality, warmup_steps: 4}", one, 3), l3 * l3 / 2, 1e-5);
  // A layer that concentrates (H below log 3) is pushed to spread: the dominant score's
  // gradient is positive and the others' negative.
  auto s = torch::tensor({{1.f, .01f, .01f, .01f, .01f, .01f}}).requires_grad_(true);
  auto d = decision(s);
  ctx.step = 0;
  RoutingRecord r{d, ctx, pool, g, {}, 2};
  make_loss("{kind: pool_cardinality}")->layer_loss(r).backward();
  EXPECT_GT(s.grad()[0][0].item<double>(), 0.0);
  EXPECT_LT(s.grad()[0][1].item<double>(), 0.0);
}

TEST(UnitLosses, SequenceScopeAveragesThePerSequenceLoss) {
  torch::manual_seed(10);
  auto logits = torch::randn({6, 4});
  auto d = decision_from(logits, 2);
  ExpertPool pool(4, 2, 2);
  GlobalLoad g;
  RoutingContext ctx;
  ctx.seq_T = torch::tensor({0, 0, 0, 1, 1, 1}, torch::kLong);
  ctx.n_seq = 2;
  auto micro = make_loss("{kind: load_balance}");
  double expect = 0;
  for (int s = 0; s < 2; ++s) {
    auto ds = decision_from(logits.narrow(0, 3 * s, 3), 2);
    RoutingContext c1;
    RoutingRecord r1{ds, c1, pool, g, {}, 1};
    expect += micro->layer_loss(r1).item<double>() / 2;
  }
  RoutingRecord rec{d, ctx, pool, g, {}, 1};
  EXPECT_NEAR(make_loss("{kind: load_balance, scope: sequence}")->layer_loss(rec).item<double>(),
              expect, 1e-6);
}

TEST(UnitLosses, GlobalBatchLoadBalanceOverFourMicroBatchesEqualsTheConcatenation) {
  torch::manual_seed(11);
  const int64_t E = 6, K = 2;
  std::vector<at::Tensor> parts;
  for (int m = 0; m < 4; ++m) parts.push_back(torch::randn({5 + m, E}) * (m + 1));
  ExpertPool pool(E, 2, 2);
  RoutingContext ctx;
  auto global = make_loss("{kind: load_balance, scope: global}");
  GlobalLoad g;
  double last_grad_norm = 0;
  at::Tensor last_loss;
  for (int m = 0; m < 4; ++m) {
    auto d = decision_from(parts[m], K);
    // What MoeLayer does per training forward: add the micro-batch, then compute the loss.
    auto counts = d.lb_map_TS.sum(0), probs = d.probs_TS.detach().sum(0);
    g.counts_S = g.counts_S.defined() ? g.counts_S + counts : counts;
    g.prob_sum_S = g.prob_sum_S.defined() ? g.prob_sum_S + probs : probs;
    g.tokens += static_cast<double>(parts[m].size(0));
    RoutingRecord rec{d, ctx, pool, g, {}, 1};
    last_loss = global->layer_loss(rec);
    (void)last_grad_norm;
  }
  auto all = decision_from(torch::cat(parts), K);
  GlobalLoad none;
  RoutingRecord rall{all, ctx, pool, none, {}, 1};
  const double concat = make_loss("{kind: load_balance}")->layer_loss(rall).item<double>();
  EXPECT_NEAR(g.value(), concat, 1e-6);
  // The last micro-batch's loss uses the whole step's counts: f equals the concatenation's f.
  auto f_all = all.lb_map_TS.sum(0) / all.lb_map_TS.sum();
  auto d3 = decision_from(parts[3], K);
  auto expect3 = (f_all * d3.probs_TS.mean(0)).sum().item<double>() * E;
  EXPECT_NEAR(last_loss.item<double>(), expect3, 1e-6);
}

TEST(UnitLosses, PaddingNeverCountsInRoutingLosses) {
  torch::manual_seed(12);
  auto logits = torch::randn({8, 4});
  ExpertPool pool(4, 2, 2);
  GlobalLoad g;
  RoutingContext with_pad;
  with_pad.valid_T = torch::tensor({1, 1, 1, 1, 1, 0, 0, 0}, torch::kBool);
  RoutingDecision d = decision_from(logits, 2);
  d.lb_map_TS = selection_map(topk_indices(d.probs_TS, 2), 4, with_pad.valid_T);
  RoutingDecision real = decision_from(logits.narrow(0, 0, 5), 2);
  RoutingContext none;
  for (const char* k : {"{kind: load_balance}", "{kind: z_loss}", "{kind: router_entropy}"}) {
    auto l = make_loss(k);
    RoutingRecord a{d, with_pad, pool, g, {}, 1}, b{real, none, pool, g, {}, 1};
    EXPECT_NEAR(l->layer_loss(a).item<double>(), l->layer_loss(b).item<double>(), 1e-6) << k;
  }
}

TEST(UnitLosses, ErcGradientsPushTowardsBothConstraints) {
  // M[i, j]: proxy i through expert j. Off-diagonal M[0, 1] = 2 violates both constraints
  // (it exceeds M[0, 0] = 1 and M[1, 1] = 1.5).
  auto M = torch::tensor({{1.0f, 2.0f}, {0.5f, 1.5f}}, torch::requires_grad());
  auto l = erc_hinge(M, 1.0);
  l.backward();
  auto g = M.grad();
  EXPECT_GT(g[0][1].item<double>(), 0);  // lower the off-diagonal response
  EXPECT_LT(g[0][0].item<double>(), 0);  // raise proxy 0's response on its own expert
  EXPECT_LT(g[1][1].item<double>(), 0);  // raise expert 1's response to its own proxy
  EXPECT_EQ(g[1][0].item<double>(), 0);  // satisfied pair: no gradient
  EXPECT_NEAR(l.item<double>(), ((2 - 1.0) + (2 - 1.5)) / 4, 1e-6);
  // Through the whole loss: a few gradient steps on router rows and gate projections lower it.
  torch::manual_seed(13);
  auto layer = make_layer("{n_expert: 4, d_expert: 6}", "{kind: token_choice, top_k: 1}", 8);
  auto erc = make_loss("{kind: erc, alpha: 0.8}");
  RoutingContext ctx;
  GlobalLoad gl;
  std::vector<at::Tensor> params{layer->router().named_parameters()["weight"],
                                 layer->pool().named_parameters()["w_gate"]};
  torch::optim::SGD opt(params, 0.5);
  double first = 0, last = 0;
  for (int i = 0; i < 20; ++i) {
    RoutingDecision d = layer->router().route(torch::randn({4, 8}), ctx);
    RoutingRecord r{d, ctx, layer->pool(), gl, {}, 1};
    opt.zero_grad();
    auto v = erc->layer_loss(r);
    v.backward();
    opt.step();
    if (i == 0) first = v.item<double>();
    last = v.item<double>();
  }
  EXPECT_GT(first, 0);
  EXPECT_LT(last, first * 0.5) << first << " -> " << last;
}

TEST(ComponentMoe, AuxLossReachesTheRouterWithoutChangingTheForward) {
  torch::manual_seed(14);
  auto layer = make_layer("{n_expert: 4, d_expert: 8}", "{kind: token_choice, top_k: 2}", 16);
  auto x = torch::randn({2, 6, 16});
  layer->eval();
  auto y_plain = layer->forward(x, nullptr).detach();
  layer->train();
  layer->set_aux_losses({{"load_balance", 0.5, make_loss("{kind: load_balance}")}});
  layer->set_aux_scale(0.25);
  auto y = layer->forward(x, nullptr);
  EXPECT_TRUE(torch::equal(y.detach(), y_plain));
  // Backward of a zero main loss leaves only the aux gradient: 0.5 * 0.25 * dLBL/dW.
  (y * 0).sum().backward();
  auto w = layer->router().named_parameters()["weight"];
  auto got = w.grad().clone();
  w.mutable_grad() = at::Tensor();
  RoutingDecision d = layer->router().route(x.reshape({12, 16}), {});
  GlobalLoad g;
  RoutingContext ctx;
  RoutingRecord r{d, ctx, layer->pool(), g, {}, 1};
  (make_loss("{kind: load_balance}")->layer_loss(r) * 0.125).backward();
  EXPECT_LT(max_diff(got, w.grad()), 1e-7);
  EXPECT_GT(got.abs().max().item<double>(), 0);
  const auto v = layer->take_aux_values();
  ASSERT_EQ(v.size(), 1u);
  EXPECT_GT(v[0], 0.9);
}

// Observers see each forward's kept assignments; telemetry counts training forwards only; a removed
// observer sees nothing more.
TEST(ComponentMoe, ObserversSeeEachForwardUntilRemoved) {
  torch::manual_seed(16);
  auto layer = make_layer("{n_expert: 4, d_expert: 8}", "{kind: token_choice, top_k: 2}", 16);
  const std::vector<MoeLayer*> layers = {layer.get()};
  auto last = observe_layers<LastRouting>(layers);
  auto tel = observe_layers<RoutingTelemetry>(layers);
  layer->eval();
  layer->forward(torch::randn({1, 3, 16}), nullptr);
  EXPECT_EQ(last[0]->get().expert_A.numel(), 6);  // 3 tokens x top-2
  EXPECT_TRUE(tel[0]->take().is_null());          // not a training forward
  layer->train();
  layer->forward(torch::randn({1, 5, 16}), nullptr);
  EXPECT_EQ(last[0]->get().expert_A.numel(), 10);
  EXPECT_EQ(tel[0]->take()["tokens"].get<double>(), 5.0);
  unobserve_layers(layers, last);
  unobserve_layers(layers, tel);
  layer->forward(torch::randn({1, 2, 16}), nullptr);
  EXPECT_EQ(last[0]->get().expert_A.numel(), 10);
  EXPECT_TRUE(tel[0]->take().is_null());
}

TEST(ComponentMoe, TelemetryCountsRealTokensByMaskRatio) {
  torch::manual_seed(15);
  auto layer = make_layer("{n_expert: 4, d_expert: 8}", "{kind: token_choice, top_k: 2}", 16);
  layer->train();
  RoutingContext ctx;
  ctx.n_seq = 2;
  ctx.seq_T = torch::tensor({0, 0, 0, 0, 1, 1, 1, 1}, torch::kLong);
  ctx.mask_ratio_B = torch::tensor({0.1f, 0.9f});
  ctx.valid_T = torch::tensor({1, 1, 1, 1, 1, 1, 0, 0}, torch::kBool);
  auto tel = observe_layers<RoutingTelemetry>(std::vector<MoeLayer*>{layer.get()})[0];
  layer->forward(torch::randn({2, 4, 16}), &ctx);
  auto j = tel->take();
  ASSERT_FALSE(j.is_null());
  EXPECT_EQ(j["tokens"].get<double>(), 6.0);
  double total = 0;
  for (double c : j["tokens_per_expert"].get<std::vector<double>>()) total += c;
  EXPECT_EQ(total, 12.0);  // 6 real tokens x top-2
  ASSERT_EQ(j["by_mask_ratio"].size(), 4u);
  EXPECT_EQ(j["by_mask_ratio"][0]["tokens"].get<double>(), 4.0);
  EXPECT_EQ(j["by_mask_ratio"][3]["tokens"].get<double>(), 2.0);
  EXPECT_EQ(j["dropped"].get<double>(), 0.0);
  EXPECT_NEAR(j["experts_per_token"].get<double>(), 2.0, 1e-9);
  EXPECT_EQ(j["zero_gate"].get<double>(), 0.0);  // softmax gates are never 0
  EXPECT_TRUE(tel->take().is_null());  // reset after reading
}

TEST(UnitMoe, TelemetryValuesMatchHandMadeRoutings) {
  // 4 experts, 2 mask-ratio buckets, 6 real tokens of 2 sequences (ratios 0.2 and 0.9) and one
  // padding token. Assignments: expert 0 x3, expert 1 x1, expert 2 never, expert 3 x4.
  RoutingStats st(4, 2);
  RoutingDecision d;
  d.n_expert = 4;
  d.top_k = 2;
  d.probs_TS = torch::tensor({{0.25f, 0.25f, 0.25f, 0.25f},  // entropy log 4
                              {1.0f, 0.0f, 0.0f, 0.0f},      // 0
                              {0.5f, 0.5f, 0.0f, 0.0f},      // log 2
                              {0.0f, 0.0f, 0.0f, 1.0f},      // 0
                              {0.5f, 0.0f, 0.0f, 0.5f},      // log 2
                              {0.0f, 0.0f, 0.0f, 1.0f},      // 0
                              {0.25f, 0.25f, 0.25f, 0.25f}}); // padding: never counted
  auto tok = torch::tensor({0, 0, 1, 2, 3, 3, 4, 5}, torch::kLong);
  auto ex = torch::tensor({0, 3, 0, 1, 3, 0, 3, 3}, torch::kLong);
  auto gate = torch::full({8}, 0.5f);
  RoutingContext ctx;
  ctx.n_seq = 2;
  ctx.seq_T = torch::tensor({0, 0, 0, 1, 1, 1, 1}, torch::kLong);
  ctx.mask_ratio_B = torch::tensor({0.2f, 0.9f});
  ctx.valid_T = torch::tensor({1, 1, 1, 1, 1, 1, 0}, torch::kBool);
  st.add(d, tok, ex, gate, /*routed=*/10, ctx);
  auto j = st.to_json();
  EXPECT_EQ(j["tokens_per_expert"].get<std::vector<double>>(), (std::vector<double>{3, 1, 0, 4}));
  EXPECT_NEAR(j["max_mean"].get<double>(), 4.0 / 2.0, 1e-12);
  // Population standard deviation of {3, 1, 0, 4} is sqrt(2.5); the mean is 2.
  EXPECT_NEAR(j["cv"].get<double>(), std::sqrt(2.5) / 2.0, 1e-12);
  EXPECT_EQ(j["dead"].get<int64_t>(), 1);
  EXPECT_NEAR(j["entropy"].get<double>(), (std::log(4.0) + 2 * std::log(2.0)) / 6.0, 1e-6);
  EXPECT_NEAR(j["dropped"].get<double>(), 1.0 - 8.0 / 10.0, 1e-12);
  EXPECT_NEAR(j["experts_per_token"].get<double>(), 8.0 / 6.0, 1e-12);
  // Buckets [0, 0.5): sequence 0's tokens 0-2 (experts 0, 3, 0, 1); [0.5, 1]: tokens 3-5.
  const auto& lo = j["by_mask_ratio"][0];
  const auto& hi = j["by_mask_ratio"][1];
  EXPECT_EQ(lo["tokens"].get<double>(), 3.0);
  EXPECT_EQ(hi["tokens"].get<double>(), 3.0);
  EXPECT_EQ(lo["tokens_per_expert"].get<std::vector<double>>(), (std::vector<double>{2, 1, 0, 1}));
  EXPECT_EQ(hi["tokens_per_expert"].get<std::vector<double>>(), (std::vector<double>{1, 0, 0, 3}));
  EXPECT_NEAR(hi["max_mean"].get<double>(), 3.0 / 1.0, 1e-12);
  EXPECT_EQ(hi["dead"].get<int64_t>(), 2);
  // Experts per real token: 2 for tokens 0 and 3, 1 for tokens 1, 2, 4 and 5; padding uncounted.
  auto hist = j["experts_per_token_hist"].get<std::vector<double>>();
  EXPECT_EQ(hist[0], 0.0);
  EXPECT_EQ(hist[1], 4.0);
  EXPECT_EQ(hist[2], 2.0);
  EXPECT_EQ(j["unrouted"].get<double>(), 0.0);
}

TEST(ComponentMoe, TelemetryCountsTokensWhoseGatesAreAllZero) {
  // NormRouter with every router row equal to v: a token along +v has equal positive scores,
  // one along -v only negative logits, so all-zero scores and gates (top-k still picks slots).
  auto layer = make_layer("{n_expert: 4, d_expert: 8}", "{kind: norm_router, top_k: 2}", 16);
  layer->train();
  auto v = torch::randn({16});
  {
    torch::NoGradGuard ng;
    for (auto& p : layer->named_parameters()) {
      if (p.key() == "router.weight") p.value().copy_(v.unsqueeze(0).expand({4, 16}));
    }
  }
  auto x = torch::stack({v, -v, 2 * v, -3 * v}).view({1, 4, 16});
  RoutingContext ctx;
  auto tel = observe_layers<RoutingTelemetry>(std::vector<MoeLayer*>{layer.get()})[0];
  layer->forward(x, &ctx);
  auto j = tel->take();
  ASSERT_FALSE(j.is_null());
  EXPECT_NEAR(j["zero_gate"].get<double>(), 0.5, 1e-9);
  EXPECT_NEAR(j["experts_per_token"].get<double>(), 2.0, 1e-9);
}

}  // namespace
}  // namespace mixdiff
