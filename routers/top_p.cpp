// top_p: dynamic routing of "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
// (Huang et al., arXiv 2403.07652; algorithms.md 11.3). Per token: softmax over the experts,
// sorted descending, experts are kept until their cumulative probability first reaches `p`
// (the crossing expert included), at most `max_k`. Gates are the raw kept probabilities (no
// renormalisation). The paper pairs it with the load-balancing loss and a "dynamic" loss that
// lowers the router's entropy (`router_entropy` in the losses registry; their weights: LBL 1e-2,
// entropy 1e-4). The telemetry's experts_per_token and its mask-ratio buckets show how many
// experts masked and clean tokens take.
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/errors.h"
#include "moe/router.h"

namespace mixdiff {
namespace {

class TopPRouter : public RouterBase {
 public:
  TopPRouter(const ConfigNode& c, const RouterDims& dims) : n_expert_(dims.n_expert) {
    p_ = c.get<double>("p", 0.4);
    if (!(p_ > 0 && p_ <= 1)) c.fail("p", str("expected a probability in (0, 1], got ", p_));
    max_k_ = c.get<int64_t>("max_k", n_expert_);
    if (max_k_ <= 0 || max_k_ > n_expert_) {
      c.fail("max_k", str("expected 1..", n_expert_, ", got ", max_k_));
    }
    weight_ = register_parameter("weight", torch::empty({n_expert_, dims.d_model}));
    torch::NoGradGuard ng;
    weight_.normal_(0.0, 0.02);
  }

  RoutingDecision route(const at::Tensor& x_TD, const RoutingContext& ctx) override {
    RoutingDecision d;
    d.n_expert = n_expert_;
    d.top_k = max_k_;
    d.weight_SD = weight_;
    d.logits_TS = router_logits_fp32(x_TD, weight_);
    hide_invisible_slots(d, ctx, n_expert_, -std::numeric_limits<float>::infinity());
    d.probs_TS = torch::softmax(d.logits_TS, -1);
    at::Tensor idx_TK, keep_TK;
    {
      torch::NoGradGuard ng;
      at::Tensor p_TS = d.probs_TS.detach();
      if (ctx.allowed_TS.defined()) {
        p_TS = p_TS.masked_fill(ctx.allowed_TS.to(p_TS.device()).logical_not(), 0.0);
      }
      auto sorted = p_TS.sort(/*stable=*/true, -1, /*descending=*/true);
      auto vals_TK = std::get<0>(sorted).narrow(1, 0, max_k_);
      idx_TK = std::get<1>(sorted).narrow(1, 0, max_k_).contiguous();
      // Keep slot j while the mass before it is still below p: the crossing expert is kept.
      auto before_TK = vals_TK.cumsum(1) - vals_TK;
      keep_TK = before_TK < p_;
      keep_TK.select(1, 0).fill_(true);
      if (ctx.allowed_TS.defined()) keep_TK = keep_TK & (vals_TK > 0);
      if (ctx.valid_T.defined()) keep_TK = keep_TK & ctx.valid_T.to(keep_TK.device()).unsqueeze(1);
      d.lb_map_TS = torch::zeros_like(d.probs_TS).scatter_(1, idx_TK, keep_TK.to(torch::kFloat32));
    }
    auto gate_TK = d.probs_TS.gather(1, idx_TK);
    const int64_t T = idx_TK.size(0), K = idx_TK.size(1);
    auto flat_A = keep_TK.reshape({-1}).nonzero().squeeze(1);
    d.token_A = torch::arange(T, idx_TK.options().dtype(torch::kLong))
                    .unsqueeze(1)
                    .expand({T, K})
                    .reshape({-1})
                    .index_select(0, flat_A);
    d.expert_A = idx_TK.reshape({-1}).index_select(0, flat_A);
    d.gate_A = gate_TK.reshape({-1}).index_select(0, flat_A);
    return d;
  }

  int64_t top_k() const override { return max_k_; }
  double planned_experts_per_token() const override { return std::nan(""); }

  std::string describe() const override {
    return str("top_p p=", format_double(p_), " (at most ", max_k_, " experts)");
  }

 private:
  int64_t n_expert_;
  double p_ = 0.4;
  int64_t max_k_ = 0;
  at::Tensor weight_;
};

MIXDIFF_REGISTER(routers_registry(), "top_p",
                 "dynamic top-p routing (Huang et al. 2024): experts until cumulative prob >= p; "
                 "keys: p (0.4), max_k",
                 [](const ConfigNode& c, const RouterDims& d) -> std::shared_ptr<RouterBase> {
                   return std::make_shared<TopPRouter>(c, d);
                 });

}  // namespace
}  // namespace mixdiff
