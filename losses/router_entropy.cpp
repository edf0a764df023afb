// router_entropy: mean entropy of the routing distribution over the real tokens, the "dynamic
// loss" that dynamic top-p routing trains with so that tokens cannot all take many experts
// (Huang et al., arXiv 2403.07652; algorithms.md 11.3; weight ~1e-4 there).
#include <torch/torch.h>

#include "moe/moe_layer.h"

namespace mixdiff {
namespace {

class RouterEntropy : public RoutingLoss {
 public:
  at::Tensor layer_loss(const RoutingRecord& r) override {
    const auto& p_TS = r.decision.probs_TS;
    return real_token_mean(-(p_TS * p_TS.clamp_min(1e-30).log()).sum(-1), r.ctx);
  }
};

MIXDIFF_REGISTER(routing_losses_registry(), "router_entropy",
                 "mean entropy of the routing distribution (top-p routing's dynamic loss)",
                 [](const ConfigNode&) -> std::shared_ptr<RoutingLoss> {
                   return std::make_shared<RouterEntropy>();
                 });

}  // namespace
}  // namespace mixdiff
