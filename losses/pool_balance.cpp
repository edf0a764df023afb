// pool_balance: UniPool's pool-level load-balancing loss (arXiv 2605.06665; algorithms.md 2.2),
// for pools shared by several layers (model.kind unipool_dlm or rexmoe_dlm). With u_bar the
// expert usage of the PREVIOUS micro-batch averaged over the N_L layers that share the pool (each
// layer's unbiased top-K counts divided by its routed tokens; no gradient; one step behind, as
// the paper's PoolAuxLossAccumulator), P_l the sum over the layer's real tokens of its raw router
// scores (NormRouter's S, or the probabilities) mapped to pool experts, M the pool size, K the
// layer's top-K and T its token count, each layer adds
//   M * sum_i u_bar_i P_l,i / (K T N_L)
// (the switch LBL M sum f_i P_i / N_L with f = u / K and P = P_l / T; no loss before the first
// micro-batch). Under data parallelism the counts AND the token count of u are summed over the
// ranks (the global micro-batch's usage) while P stays local and divided by the local T, so that
// the averaged gradients of W ranks equal one process with the W-times batch. u_bar is a buffer
// of the pool, so a resumed run continues with it.
#include <torch/torch.h>

#include "core/errors.h"
#include "moe/experts.h"
#include "moe/moe_layer.h"

namespace mixdiff {
namespace {

class PoolBalance : public RoutingLoss {
 public:
  at::Tensor layer_loss(const RoutingRecord& r) override {
    PoolUsage* u = r.pool.usage();
    TORCH_CHECK(u, "[pool_balance] the layer's experts are not a shared pool (use model.kind "
                   "unipool_dlm or rexmoe_dlm)");
    const auto& d = r.decision;
    const int64_t S = d.n_expert, M = r.pool.n_expert();
    auto w_T = valid_weights(r.ctx.valid_T, d.probs_TS.size(0), d.probs_TS.device());
    const at::Tensor& scores_TS = d.scores_TS.defined() ? d.scores_TS : d.probs_TS;
    auto P_S = (scores_TS.narrow(1, 0, S) * w_T.unsqueeze(1)).sum(0);
    const bool global = r.global.last_counts_S.defined() && r.global.last_tokens > 0;
    at::Tensor counts_S = global ? r.global.last_counts_S.narrow(0, 0, S)
                                 : d.lb_map_TS.narrow(1, 0, S).sum(0);
    auto to_pool = [&](const at::Tensor& v) {
      return r.candidates_S.defined()
                 ? torch::zeros({M}, v.options()).index_add(0, r.candidates_S.to(v.device()), v)
                 : v;
    };
    auto P_M = to_pool(P_S);
    const double T = w_T.sum().item<double>();
    const double routed = global ? r.global.last_tokens : T;  // tokens behind `counts_S`
    const auto N = static_cast<double>(r.pool_users);
    at::Tensor loss;
    if (u->ready.item<double>() > 0 && T > 0) {
      // A copy: the buffer is updated in place below, before the backward pass.
      loss = (u->prev_M.to(P_M.device()).clone() * P_M).sum() * static_cast<double>(M) /
             (static_cast<double>(d.top_k) * T * N);
    } else {
      loss = P_M.sum() * 0.0;
    }
    {
      torch::NoGradGuard ng;
      // sum_M is a plain member (not saved) built on the host: it follows the counts' device.
      if (u->sum_M.device() != counts_S.device()) u->sum_M = u->sum_M.to(counts_S.device());
      if (routed > 0) u->sum_M.add_(to_pool(counts_S.detach()).to(u->sum_M.device()) / routed);
      if (++u->seen >= r.pool_users) {
        u->prev_M.copy_(u->sum_M / N);
        u->ready.fill_(1.0);
        u->sum_M.zero_();
        u->seen = 0;
      }
    }
    return loss;
  }
};

MIXDIFF_REGISTER(routing_losses_registry(), "pool_balance",
                 "UniPool pool-level LBL on the previous micro-batch's layer-averaged pool usage "
                 "(shared pools only)",
                 [](const ConfigNode&) -> std::shared_ptr<RoutingLoss> {
                   return std::make_shared<PoolBalance>();
                 });

}  // namespace
}  // namespace mixdiff
