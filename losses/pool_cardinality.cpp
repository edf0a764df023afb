// pool_cardinality: UniPool-lock's target-cardinality entropy loss (arXiv 2605.06665 v2, the
// full-pool phase; algorithms.md 2.2). Per routed layer l, with s_l the mean over the layer's
// real tokens of its raw router scores (NormRouter's S, or the probabilities) over its slots,
// p_l = s_l / sum(s_l) the layer's population-level routing distribution and H_l its entropy,
//   (H_l - log K_tar)^2 / N_L
// where N_L is the number of layers sharing the pool and K_tar the number of experts a layer
// should use: `target_experts`, default the layer's share of the pool, M / N_L (the vanilla
// n_expert; the paper's K_tar = E = 8). The weight (the paper's 5e-3) ramps up linearly over
// `warmup_steps` (the paper's 1000 of 60k). Unlike the pool-level LBL, whose value falls when
// every score shrinks, this term depends only on how the scores are spread, so it pushes back
// when a layer concentrates on a few experts, before its scores reach the ReLU's dead zone.
// Under data parallelism s_l is the mean over the global batch (the score sums and token counts
// of every rank), and each rank's gradient is scaled by the world size W, so that the averaged
// gradients equal one process's on the W-times batch (the term is not linear in the tokens).
// The paper's candidate freeze, MILP partition and lock that follow this phase are not built.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/errors.h"
#include "moe/experts.h"
#include "moe/moe_layer.h"

namespace mixdiff {
namespace {

class PoolCardinality : public RoutingLoss {
 public:
  explicit PoolCardinality(const ConfigNode& c)
      : target_(c.get<int64_t>("target_experts", 0)), warmup_(c.get<int64_t>("warmup_steps", 0)) {
    if (target_ < 0) c.fail("target_experts", "expected >= 1 (or 0: the layer's share of the pool)");
    if (warmup_ < 0) c.fail("warmup_steps", "expected >= 0");
  }

  at::Tensor layer_loss(const RoutingRecord& r) override {
    const auto& d = r.decision;
    const int64_t S = d.n_expert;
    const at::Tensor& scores_TS = d.scores_TS.defined() ? d.scores_TS : d.probs_TS;
    auto w_T = valid_weights(r.ctx.valid_T, scores_TS.size(0), scores_TS.device());
    auto sum_S = (scores_TS.narrow(1, 0, S).to(torch::kFloat32) * w_T.unsqueeze(1)).sum(0);  // [S]
    at::Tensor n = w_T.sum();
    double world = 1.0;
    if (r.reduce && *r.reduce) {
      // The global batch's sums: this rank's with their gradient, the others' as constants.
      auto packed = torch::cat({sum_S.detach(), n.reshape({1}), torch::ones({1}, n.options())});
      (*r.reduce)(packed);
      sum_S = sum_S + (packed.narrow(0, 0, S) - sum_S.detach());
      n = packed[S];
      world = packed[S + 1].item<double>();
    }
    auto s_S = sum_S / n.clamp_min(1.0);
    auto p_S = s_S / (s_S.sum() + 1e-8);
    auto H = -(p_S * (p_S + 1e-8).log()).sum();
    const int64_t share = std::max<int64_t>(1, r.pool.n_expert() / std::max<int64_t>(1, r.pool_users));
    const double target = std::log(static_cast<double>(target_ > 0 ? target_ : share));
    const double ramp =
        warmup_ > 0 ? std::min(1.0, static_cast<double>(r.ctx.step + 1) / static_cast<double>(warmup_))
                    : 1.0;
    auto loss = (H - target).pow(2) * (ramp / static_cast<double>(r.pool_users));
    // The value is the global term; the gradient is W times this rank's share of it.
    return world == 1.0 ? loss : loss * world - loss.detach() * (world - 1.0);
  }

 private:
  int64_t target_, warmup_;
};

MIXDIFF_REGISTER(routing_losses_registry(), "pool_cardinality",
                 "UniPool-lock's target-cardinality entropy loss on each layer's population-level "
                 "routing distribution (target_experts, warmup_steps)",
                 [](const ConfigNode& c) -> std::shared_ptr<RoutingLoss> {
                   return std::make_shared<PoolCardinality>(c);
                 });

}  // namespace
}  // namespace mixdiff
