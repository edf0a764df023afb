#include "moe/routing_loss.h"

#include <torch/torch.h>

namespace mixdiff {

RoutingLossRegistry& routing_losses_registry() {
  static RoutingLossRegistry r("routing_losses",
                               "losses on routing decisions, computed in every MoE layer (losses: "
                               "- {kind: ..., weight: ...})");
  return r;
}

at::Tensor real_token_mean(const at::Tensor& v_T, const RoutingContext& ctx) {
  auto w_T = valid_weights(ctx.valid_T, v_T.size(0), v_T.device());
  return (v_T * w_T).sum() / w_T.sum().clamp_min(1.0);
}

void GlobalLoad::reset() {
  counts_S = at::Tensor();
  last_counts_S = at::Tensor();
  prob_sum_S = at::Tensor();
  last_tokens = 0;
  tokens = 0;
  micro = 0;
}

double GlobalLoad::value() const {
  if (!counts_S.defined() || tokens <= 0) return 0.0;
  const double total = counts_S.sum().item<double>();
  if (total <= 0) return 0.0;
  const auto S = static_cast<double>(counts_S.size(0));
  return S * ((counts_S / total) * (prob_sum_S / tokens)).sum().item<double>();
}

}  // namespace mixdiff
