// The slot map and capacity stages of the MoE layer: an architecture that re-maps router slots
// onto a shared pool and hides some of them is a SlotMap subclass outside the core (this file
// plays the part of a new models/ file), and the capacity stage keeps assignments by its policy.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <set>

#include "core/config.h"
#include "moe/capacity_limit.h"
#include "moe/dispatcher.h"
#include "moe/experts.h"
#include "moe/moe_layer.h"
#include "moe/observers.h"
#include "moe/router.h"
#include "moe/slot_map.h"

namespace mixdiff {
namespace {

/// A map a new paper might bring: 4 router slots over pool experts {6, 4, 2, 0} of an 8-expert
/// pool, of which slots 1 and 3 are hidden in training until step 10.
class ReversedEvenSlots : public SlotMap {
 public:
  explicit ReversedEvenSlots(std::shared_ptr<ExpertPool> pool)
      : SlotMap(std::move(pool), torch::tensor({6, 4, 2, 0}, torch::kLong), /*pool_users=*/2) {}
  at::Tensor visible(int64_t step, bool training, const c10::Device& device) override {
    if (!training || step >= 10) return {};
    return torch::tensor({true, false, true, false}, torch::TensorOptions().device(device));
  }
  std::string describe() const override { return "reversed even slots"; }
};

std::shared_ptr<MoeLayer> layer_over(std::shared_ptr<SlotMap> slots, int64_t d_model) {
  ConfigNode moe = ConfigNode::from_string("{n_expert: 4, d_expert: 8}", "moe.yaml");
  ConfigNode router = ConfigNode::from_string("{kind: token_choice, top_k: 1}", "router.yaml");
  MoeOptions o = MoeOptions::from(moe, d_model);
  auto r = routers_registry().create("token_choice", "kind", router, RouterDims{d_model, 4});
  return std::make_shared<MoeLayer>(o, r, std::move(slots));
}

TEST(ComponentMoe, ASlotMapOutsideTheCoreRoutesIntoASharedPool) {
  torch::manual_seed(5);
  const int64_t D = 12;
  auto pool = std::make_shared<ExpertPool>(8, D, 8);
  auto slots = std::make_shared<ReversedEvenSlots>(pool);
  auto layer = layer_over(slots, D);
  {
    torch::NoGradGuard ng;
    for (auto& p : layer->parameters()) p.normal_(0.0, 0.3);
    for (auto& p : pool->parameters()) p.normal_(0.0, 0.3);
  }
  // The pool is the model's: the layer does not register it as its own parameters.
  for (const auto& kv : layer->named_parameters()) {
    EXPECT_EQ(kv.key().rfind("experts.", 0), std::string::npos) << kv.key();
  }
  EXPECT_NE(layer->describe().find("4 slots of a shared pool of 8 experts"), std::string::npos)
      << layer->describe();
  EXPECT_NE(layer->describe().find("reversed even slots"), std::string::npos);
  EXPECT_EQ(layer->slots().pool_users(), 2);

  auto last = std::make_shared<LastRouting>();
  layer->add_observer(last);
  auto x = torch::randn({2, 16, D});
  auto x_TD = x.reshape({32, D});
  auto used = [&](int64_t step, bool training) {
    layer->train(training);
    RoutingContext ctx;
    ctx.step = step;
    ctx.probe = true;  // no routing state is updated
    auto y = layer->forward(x, &ctx);
    const RoutingDecision& d = last->get();
    // The output is the pool's experts of the mapped slots, gated as routed.
    auto pool_expert_A = torch::tensor({6, 4, 2, 0}, torch::kLong).index_select(0, d.expert_A);
    auto want = pool->forward(x_TD, d.token_A, pool_expert_A, d.gate_A, *make_dispatcher("loop"));
    EXPECT_LT((y.reshape({32, D}) - want).abs().max().item<double>(), 1e-5);
    std::set<int64_t> s;
    for (int64_t i = 0; i < d.expert_A.numel(); ++i) s.insert(d.expert_A[i].item<int64_t>());
    return s;
  };
  for (int64_t s : used(0, true)) EXPECT_TRUE(s == 0 || s == 2) << s;  // hidden: never chosen
  EXPECT_GT(used(10, true).size(), 2u);                  // the schedule opens them
  EXPECT_GT(used(0, false).size(), 2u);                  // and outside training
}

TEST(UnitMoe, CapacityKeepsTheBestByPolicy) {
  // Expert 0 gets 4 assignments (tokens 0..3 and 4), expert 1 one; capacity 2.
  auto expert = torch::tensor({0, 0, 0, 1, 0}, torch::kLong);
  auto gate = torch::tensor({0.1, 0.9, 0.5, 0.3, 0.7});
  auto by_prob = ExpertCapacity::keep(expert, -gate, 2, 2);
  EXPECT_TRUE(torch::equal(by_prob, torch::tensor({1, 3, 4}, torch::kLong))) << by_prob;
  auto by_pos = ExpertCapacity::keep(expert, torch::arange(5).to(torch::kDouble), 2, 2);
  EXPECT_TRUE(torch::equal(by_pos, torch::tensor({0, 1, 3}, torch::kLong))) << by_pos;
  EXPECT_FALSE(ExpertCapacity::keep(expert, -gate, 2, 4).defined());  // nothing dropped

  // The stage: C = ceil(cf * T_real * K / E) = ceil(0.8 * 5 * 1 / 2) = 2.
  const Assignments a{torch::arange(5, torch::kLong), expert, gate, {}};
  const ExpertCapacity prob(0.8, DropPolicy::kProbability), pos(0.8, DropPolicy::kPosition);
  EXPECT_EQ(prob.capacity(2, 1, 5.0), 2);
  const Assignments kp = prob.apply(a, 2, 1, 5.0, 5), ks = pos.apply(a, 2, 1, 5.0, 5);
  EXPECT_TRUE(torch::equal(kp.token_A, torch::tensor({1, 3, 4}, torch::kLong))) << kp.token_A;
  EXPECT_TRUE(torch::allclose(kp.gate_A, torch::tensor({0.9, 0.3, 0.7})));
  EXPECT_TRUE(torch::equal(ks.slot_A, torch::tensor({0, 0, 1}, torch::kLong))) << ks.slot_A;
  // A generous factor keeps everything, in order.
  const Assignments all = ExpertCapacity(4.0, DropPolicy::kPosition).apply(a, 2, 1, 5.0, 5);
  EXPECT_TRUE(torch::equal(all.token_A, a.token_A));
  EXPECT_NE(prob.describe().find("drop by probability"), std::string::npos);
}

}  // namespace
}  // namespace mixdiff
