// expert_choice: expert-choice routing for diffusion LMs (EC-DLM, arXiv 2604.01622; algorithms.md
// section 9). Each expert takes the C tokens it scores highest within a routing group, so every
// expert processes exactly C tokens of every group: balance by construction, no auxiliary loss.
//   group: sequence (default; each sequence routes alone, with the capacity of its own mask
//          ratio) or batch (all tokens of the forward, capacity from the mean mask ratio)
//   capacity: {kind: <capacity_schedules>, ...}: nominal experts per token k(r) of the group's
//          realised mask ratio r; C = max(1, floor(L k / E)) for L real tokens, E experts
//   gates: post_softmax (the paper's scripts: experts choose on raw logits; each token's gates are
//          a softmax over the experts that chose it), pre_softmax (softmax over experts first,
//          experts choose on the probabilities, gates are those probabilities), sigmoid (choose on
//          logits, gates sigmoid / sum over the experts that chose the token)
// Tokens no expert chose get no routed output (the residual and shared experts only); the
// telemetry reports that fraction (`unrouted`) and the histogram of experts per token. At
// inference the group is the forward's tokens and r the current fraction of [MASK], so the
// samplers route with EC as training did. EC-DLM's shared/routed norm scaling (`phi(|S_t|)`) is
// not implemented.
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/errors.h"
#include "moe/capacity.h"
#include "moe/router.h"

namespace mixdiff {
namespace {

class ExpertChoiceRouter : public RouterBase {
 public:
  ExpertChoiceRouter(const ConfigNode& c, const RouterDims& dims) : n_expert_(dims.n_expert) {
    group_ = c.get_choice<Group>("group", {{"sequence", Group::kSequence}, {"batch", Group::kBatch}},
                                 Group::kSequence);
    gates_ = c.get_choice<Gates>("gates",
                                 {{"post_softmax", Gates::kPostSoftmax},
                                  {"pre_softmax", Gates::kPreSoftmax},
                                  {"sigmoid", Gates::kSigmoid}},
                                 Gates::kPostSoftmax);
    schedule_ = build_capacity_schedule(c.at("capacity"));
    weight_ = register_parameter("weight", torch::empty({n_expert_, dims.d_model}));
    torch::NoGradGuard ng;
    weight_.normal_(0.0, 0.02);
  }

  /// Capacity of a group of `L` real tokens at mask ratio `r`.
  int64_t capacity(int64_t L, double r) const {
    const double k = schedule_->k(r);
    return std::min<int64_t>(
        L, std::max<int64_t>(1, static_cast<int64_t>(std::floor(static_cast<double>(L) * k /
                                                                static_cast<double>(n_expert_)))));
  }

  RoutingDecision route(const at::Tensor& x_TD, const RoutingContext& ctx) override {
    const int64_t T = x_TD.size(0), E = n_expert_;
    RoutingDecision d;
    d.n_expert = E;
    d.top_k = top_k();
    d.weight_SD = weight_;
    d.logits_TS = router_logits_fp32(x_TD, weight_);
    const at::Tensor vis_E =
        hide_invisible_slots(d, ctx, E, -std::numeric_limits<float>::infinity());
    const at::Tensor z_TE = d.logits_TS;
    d.probs_TS = torch::softmax(z_TE, -1);
    // Groups: [G, Lg] token ids.
    const bool by_seq = group_ == Group::kSequence && ctx.seq_T.defined() && ctx.n_seq > 0 &&
                        T % ctx.n_seq == 0;
    const int64_t G = by_seq ? ctx.n_seq : 1, Lg = T / G;
    at::Tensor R;  // bool [T, E]
    {
      torch::NoGradGuard ng;
      at::Tensor sel_TE = gates_ == Gates::kPreSoftmax ? d.probs_TS.detach() : z_TE.detach();
      const at::Tensor valid_T =
          ctx.valid_T.defined() ? ctx.valid_T.to(z_TE.device()) : at::Tensor();
      if (valid_T.defined()) {
        sel_TE = sel_TE.masked_fill(valid_T.logical_not().unsqueeze(1),
                                    -std::numeric_limits<float>::infinity());
      }
      sel_TE = restrict_to_allowed(sel_TE, ctx, E);
      // Host copies: the per-group capacities are computed on the CPU.
      auto valid_G = valid_T.defined() ? valid_T.view({G, Lg}).sum(1).to(torch::kCPU)
                                       : torch::full({G}, Lg, torch::kLong);
      at::Tensor ratio_B;
      if (ctx.mask_ratio_B.defined()) {
        ratio_B = ctx.mask_ratio_B.to(torch::kCPU).to(torch::kFloat64);
      }
      std::vector<int64_t> caps(static_cast<size_t>(G));
      int64_t cmax = 1;
      for (int64_t g = 0; g < G; ++g) {
        const double r = !ratio_B.defined() ? 0.5
                         : by_seq           ? ratio_B[g].item<double>()
                                            : ratio_B.mean().item<double>();
        caps[static_cast<size_t>(g)] = capacity(valid_G[g].item<int64_t>(), r);
        cmax = std::max(cmax, caps[static_cast<size_t>(g)]);
      }
      cmax = std::min(cmax, Lg);
      // Per group, each expert's top-cmax tokens; picks beyond the group's capacity dropped.
      auto s = sel_TE.view({G, Lg, E}).transpose(1, 2);              // [G, E, Lg]
      auto picked_GEC = topk_indices(s.reshape({G * E, Lg}), cmax).view({G, E, cmax});
      auto rank_ok = (torch::arange(cmax, torch::kLong).view({1, 1, cmax}) <
                      torch::tensor(caps, torch::kLong).view({G, 1, 1}))
                         .to(picked_GEC.device());
      R = torch::zeros({G, E, Lg}, picked_GEC.options().dtype(torch::kBool))
              .scatter_(2, picked_GEC, rank_ok.expand({G, E, cmax}));
      R = R.transpose(1, 2).reshape({T, E});                          // [T, E]
      if (valid_T.defined()) R = R & valid_T.unsqueeze(1);
      if (vis_E.defined()) R = R & vis_E.unsqueeze(0);
      d.lb_map_TS = R.to(torch::kFloat32);
    }
    at::Tensor gate_TE;
    if (gates_ == Gates::kPreSoftmax) {
      gate_TE = d.probs_TS;
    } else if (gates_ == Gates::kSigmoid) {
      auto s_TE = torch::sigmoid(z_TE) * R.to(torch::kFloat32);
      gate_TE = s_TE / s_TE.sum(-1, true).clamp_min(1e-20);
    } else {  // sparse softmax over the experts that chose each token (no NaN on empty rows)
      auto zm_TE = z_TE.masked_fill(R.logical_not(), -std::numeric_limits<float>::infinity());
      auto mx = std::get<0>(zm_TE.max(-1, true)).detach();
      mx = mx.masked_fill(torch::isinf(mx), 0.0);
      auto e_TE = torch::exp(z_TE.masked_fill(R.logical_not(), 0.0) - mx) * R.to(torch::kFloat32);
      gate_TE = e_TE / e_TE.sum(-1, true).clamp_min(1e-30);
    }
    auto nz = R.nonzero();  // row-major: token ids non-decreasing
    d.token_A = nz.select(1, 0).contiguous();
    d.expert_A = nz.select(1, 1).contiguous();
    d.gate_A = gate_TE.index({d.token_A, d.expert_A});
    return d;
  }

  int64_t top_k() const override {
    return std::max<int64_t>(1, static_cast<int64_t>(std::llround(schedule_->mean_k())));
  }
  /// The capacity schedule's mean k over r ~ U(0, 1) (a run measures the realised value).
  double planned_experts_per_token() const override { return schedule_->mean_k(); }

  std::string describe() const override {
    return str("expert_choice (", group_ == Group::kSequence ? "sequence" : "batch", " groups, ",
               gates_ == Gates::kPostSoftmax ? "post_softmax"
               : gates_ == Gates::kPreSoftmax ? "pre_softmax"
                                              : "sigmoid",
               ", capacity ", schedule_->name,
               " k in [", format_double(schedule_->k_min), ", ", format_double(schedule_->k_max),
               "], mean ", format_double(std::round(schedule_->mean_k() * 1000) / 1000), ")");
  }

 private:
  int64_t n_expert_;
  enum class Group { kSequence, kBatch };
  enum class Gates { kPostSoftmax, kPreSoftmax, kSigmoid };
  Group group_ = Group::kSequence;
  Gates gates_ = Gates::kPostSoftmax;
  std::shared_ptr<CapacitySchedule> schedule_;
  at::Tensor weight_;
};

MIXDIFF_REGISTER(routers_registry(), "expert_choice",
                 "expert-choice routing (EC-DLM): each expert takes its top-C tokens per "
                 "sequence (or batch), C from a capacity schedule over the mask ratio; keys: "
                 "capacity, group, gates",
                 [](const ConfigNode& c, const RouterDims& d) -> std::shared_ptr<RouterBase> {
                   return std::make_shared<ExpertChoiceRouter>(c, d);
                 });

}  // namespace
}  // namespace mixdiff
