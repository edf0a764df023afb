// z_loss: the router z-loss of ST-MoE (Zoph et al., arXiv 2202.08906; algorithms.md 11.1):
// mean over the real tokens of logsumexp(router logits)^2, fp32. Keeps router logits small
// (typical weight 1e-3); also bounds logit growth for sigmoid routers.
#include <torch/torch.h>

#include "moe/moe_layer.h"

namespace mixdiff {
namespace {

class ZLoss : public RoutingLoss {
 public:
  at::Tensor layer_loss(const RoutingRecord& r) override {
    return real_token_mean(r.decision.logits_TS.logsumexp(-1).pow(2), r.ctx);
  }
};

MIXDIFF_REGISTER(losses_registry(), "z_loss",
                 "router z-loss (ST-MoE): mean logsumexp(logits)^2 over real tokens",
                 [](const ConfigNode&) -> std::shared_ptr<LossTerm> {
                   return std::make_shared<ZLoss>();
                 });

}  // namespace
}  // namespace mixdiff
