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
    const auto& z = r.decision.logits_TS;
    auto w = valid_weights(r.ctx.valid_T, z.size(0)).to(z.device());
    return (z.logsumexp(-1).pow(2) * w).sum() / w.sum().clamp_min(1.0);
  }
};

MIXDIFF_REGISTER(losses_registry(), "z_loss",
                 "router z-loss (ST-MoE): mean logsumexp(logits)^2 over real tokens",
                 [](const ConfigNode&) -> std::shared_ptr<LossTerm> {
                   return std::make_shared<ZLoss>();
                 });

}  // namespace
}  // namespace mixdiff
