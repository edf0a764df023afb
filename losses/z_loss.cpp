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
  // NormRouter's scores are L2-normalised logits, so the z-loss cannot shrink them; all it does
  // is push every logit below zero, where the ReLU kills every score and the gradient: the router
  // collapses onto experts 0..K-1 for good (seen in a UniPool sweep).
  std::string refuses(const RouterBase& router) const override {
    if (!router.scores_from_normalised_logits()) return "";
    return "z_loss with a router whose scores are normalised logits (norm_router) drives every "
           "logit negative and kills the ReLU scores; leave it out (UniPool uses pool_balance)";
  }
};

MIXDIFF_REGISTER(routing_losses_registry(), "z_loss",
                 "router z-loss (ST-MoE): mean logsumexp(logits)^2 over real tokens",
                 [](const ConfigNode&) -> std::shared_ptr<RoutingLoss> {
                   return std::make_shared<ZLoss>();
                 });

}  // namespace
}  // namespace mixdiff
