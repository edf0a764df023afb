// token_choice: the top-K token-choice router every MoE paper starts from (algorithms.md section
// 0), with the variants of Megatron-Core, DeepSeek-V2/V3 and LLaDA2.0:
//   score        softmax (Switch/Mixtral/DeepSeek-V2) or sigmoid (DeepSeek-V3, LLaDA2.0; the
//                losses then see sigmoid / sum(sigmoid), as Megatron does)
//   softmax      before_topk: gates are full-softmax probabilities of the chosen experts
//                (optionally renormalised); after_topk: top-K on the logits, softmax over the K
//                chosen (Mixtral; equal to before_topk + normalize when there is no offset)
//   normalize    divide the K gates by their sum (default: true for sigmoid, false for softmax)
//   scaling      routed_scaling_factor multiplying the gates (DeepSeek-V3/LLaDA2.0: 2.5)
//   n_group, topk_group, group_score
//                group-limited routing (DeepSeek-V3 node-limited / LLaDA2.0: 8 groups, keep 4):
//                experts are split into n_group equal groups, a group's score is the sum of its
//                two best selection scores (top2_sum, V3) or its best (max, V2), only the
//                topk_group best groups stay eligible
//   n_null       AdaMoE null experts (arXiv 2406.13233; algorithms.md 11.4): extra routing slots
//                that output zero and cost nothing. RECONSTRUCTED choices: each null slot has its
//                own router row, gates are normalised over all K chosen slots (null included),
//                and the load-balancing losses count null slots as experts, so the LBL controls
//                their average use.
//   balancer     a selection offset from the `balancers` registry (aux_free, bip) or none; it
//                enters the selection scores (before the group scores, as LLaDA2.0 does), never
//                the gates.
// Slots the layer hides this forward (RoutingContext::visible_S: UniPool masks, ReXMoE's PSR) get
// -inf logits: zero probability, never selected. Ties in the top-K go to the lower expert index.
// Router math is fp32.
#include <torch/torch.h>

#include <cmath>

#include <limits>

#include "core/errors.h"
#include "moe/router.h"

namespace mixdiff {
namespace {

struct TokenChoiceOptions {
  int64_t top_k = 2;
  bool sigmoid = false;
  bool softmax_after_topk = false;
  bool normalize = false;
  double scaling = 1.0;
  int64_t n_group = 1, topk_group = 1;
  bool group_top2 = true;
  int64_t n_null = 0;

  static TokenChoiceOptions from(const ConfigNode& c, int64_t n_expert) {
    TokenChoiceOptions o;
    o.n_null = c.get<int64_t>("n_null", 0);
    if (o.n_null < 0) c.fail("n_null", "expected >= 0");
    const int64_t S = n_expert + o.n_null;
    o.top_k = c.get<int64_t>("top_k");
    if (o.top_k <= 0 || o.top_k > S) {
      c.fail("top_k", str("expected 1..", S, " (experts + null experts), got ", o.top_k));
    }
    const std::string score = c.get<std::string>("score", "softmax");
    if (score != "softmax" && score != "sigmoid") {
      c.fail("score", "expected softmax or sigmoid, got '" + score + "'");
    }
    o.sigmoid = score == "sigmoid";
    const std::string order = c.get<std::string>("softmax", "before_topk");
    if (order != "before_topk" && order != "after_topk") {
      c.fail("softmax", "expected before_topk or after_topk, got '" + order + "'");
    }
    o.softmax_after_topk = order == "after_topk";
    if (o.sigmoid && o.softmax_after_topk) {
      c.fail("softmax", "after_topk applies to score: softmax only");
    }
    o.normalize = c.get<bool>("normalize", o.sigmoid);
    o.scaling = c.get<double>("scaling", 1.0);
    if (!(o.scaling > 0)) c.fail("scaling", "expected a positive factor");
    o.n_group = c.get<int64_t>("n_group", 1);
    o.topk_group = c.get<int64_t>("topk_group", o.n_group);
    if (o.n_group <= 0 || S % o.n_group != 0) {
      c.fail("n_group", str("expected a divisor of the ", S, " routing slots, got ", o.n_group));
    }
    if (o.topk_group <= 0 || o.topk_group > o.n_group) {
      c.fail("topk_group", str("expected 1..n_group (", o.n_group, "), got ", o.topk_group));
    }
    if (o.topk_group * (S / o.n_group) < o.top_k) {
      c.fail("topk_group", str(o.topk_group, " groups of ", S / o.n_group,
                               " slots cannot hold top_k = ", o.top_k));
    }
    const std::string gs = c.get<std::string>("group_score", "top2_sum");
    if (gs != "top2_sum" && gs != "max") {
      c.fail("group_score", "expected top2_sum or max, got '" + gs + "'");
    }
    o.group_top2 = gs == "top2_sum";
    return o;
  }
};

class TokenChoiceRouter : public RouterBase {
 public:
  TokenChoiceRouter(const ConfigNode& c, const RouterDims& dims)
      : o_(TokenChoiceOptions::from(c, dims.n_expert)), n_expert_(dims.n_expert) {
    const int64_t S = n_expert_ + o_.n_null;
    weight_ = register_parameter("weight", torch::empty({S, dims.d_model}));
    torch::NoGradGuard ng;
    weight_.normal_(0.0, 0.02);
    if (auto b = build_balancer(c.section("balancer"), S)) {
      balancer_ = register_module("balancer", std::move(b));
    }
  }

  RoutingDecision route(const at::Tensor& x_TD, const RoutingContext& ctx) override {
    const int64_t T = x_TD.size(0), S = weight_.size(0), K = o_.top_k;
    RoutingDecision d;
    d.n_expert = n_expert_;
    d.top_k = K;
    d.weight_SD = weight_;
    d.logits_TS = router_logits_fp32(x_TD, weight_);
    const at::Tensor vis_S =
        hide_invisible_slots(d, ctx, n_expert_, -std::numeric_limits<float>::infinity());
    TORCH_CHECK(!vis_S.defined() || d.n_visible >= K, "[token_choice] ", d.n_visible,
                " visible slots for top-", K);
    at::Tensor scores_TS;  // what the gates are read from
    if (o_.sigmoid) {
      scores_TS = torch::sigmoid(d.logits_TS);
      d.probs_TS = scores_TS / (scores_TS.sum(-1, true) + 1e-20);
    } else {
      d.probs_TS = torch::softmax(d.logits_TS, -1);
      scores_TS = d.probs_TS;
    }
    const bool update = updates_state(*this, ctx);
    at::Tensor idx_TK;
    {
      torch::NoGradGuard ng;
      at::Tensor sel_TS = o_.softmax_after_topk ? d.logits_TS.detach() : scores_TS.detach();
      if (balancer_) {
        sel_TS = sel_TS +
                 balancer_->offset(scores_TS.detach(), K, ctx.valid_T, update).unsqueeze(0);
      }
      if (vis_S.defined()) {
        sel_TS = sel_TS.masked_fill(vis_S.logical_not(), -std::numeric_limits<float>::infinity());
      }
      sel_TS = restrict_to_allowed(sel_TS, ctx, n_expert_);
      const bool grouped = o_.n_group > 1 && o_.topk_group < o_.n_group;
      if (grouped) sel_TS = group_limit(sel_TS);
      idx_TK = topk_indices(sel_TS, K);
      // Balancing losses count the unbiased, ungrouped top-K of the probabilities; without an
      // offset or a group limit that is the selection itself (top-K of logits = of softmax).
      const bool plain = !balancer_ && !grouped && !vis_S.defined() && !ctx.allowed_TS.defined();
      d.lb_map_TS = selection_map(plain ? idx_TK : topk_indices(d.probs_TS.detach(), K), S,
                                  ctx.valid_T);
      if (balancer_ && update) balancer_->observe(slot_counts(idx_TK, S, ctx.valid_T));
    }
    at::Tensor gate_TK;
    if (o_.softmax_after_topk) {
      gate_TK = torch::softmax(d.logits_TS.gather(1, idx_TK), -1);
    } else {
      gate_TK = scores_TS.gather(1, idx_TK);
      if (o_.normalize) gate_TK = gate_TK / (gate_TK.sum(-1, true) + 1e-20);
    }
    if (o_.scaling != 1.0) gate_TK = gate_TK * o_.scaling;
    fill_assignments(d, idx_TK, gate_TK, ctx.valid_T);
    (void)T;
    return d;
  }

  void step_end(const StatReducer& reduce) override {
    if (balancer_) balancer_->step_end(reduce);
  }

  void set_reducer(const StatReducer& reduce) override {
    if (balancer_) balancer_->set_reducer(reduce);
  }
  void set_gatherer(const StatGatherer& gather) override {
    if (balancer_) balancer_->set_gatherer(gather);
  }

  int64_t top_k() const override { return o_.top_k; }
  /// Null experts cost nothing, and how often tokens take them only a run can tell.
  double planned_experts_per_token() const override {
    return o_.n_null > 0 ? std::nan("") : static_cast<double>(o_.top_k);
  }

  std::string describe() const override {
    return str("token_choice top-", o_.top_k, " ", o_.sigmoid ? "sigmoid" : "softmax",
               o_.softmax_after_topk ? " after top-k" : "", o_.normalize ? ", renormalised" : "",
               o_.scaling != 1.0 ? str(", scaling ", format_double(o_.scaling)) : "",
               o_.n_group > 1 ? str(", ", o_.topk_group, " of ", o_.n_group, " groups") : "",
               o_.n_null > 0 ? str(", ", o_.n_null, " null experts") : "",
               balancer_ ? ", " + balancer_->describe() : "");
  }

 private:
  /// Sets the selection scores of slots outside the topk_group best groups to -inf.
  at::Tensor group_limit(const at::Tensor& sel) const {
    const int64_t T = sel.size(0), G = o_.n_group, per = sel.size(1) / G;
    auto grouped = sel.view({T, G, per});
    at::Tensor gscore_TG;
    if (o_.group_top2 && per >= 2) {
      gscore_TG = std::get<0>(grouped.topk(2, -1)).sum(-1);  // ties do not change the sum
    } else {
      gscore_TG = std::get<0>(grouped.max(-1));
    }
    auto keep_groups = topk_indices(gscore_TG, o_.topk_group);  // [T, topk_group]
    auto gmask_TG =
        torch::zeros({T, G}, sel.options().dtype(torch::kBool)).scatter_(1, keep_groups, true);
    auto smask_TS = gmask_TG.unsqueeze(-1).expand({T, G, per}).reshape({T, G * per});
    return sel.masked_fill(smask_TS.logical_not(), -std::numeric_limits<float>::infinity());
  }

  TokenChoiceOptions o_;
  int64_t n_expert_;
  at::Tensor weight_;
  std::shared_ptr<Balancer> balancer_;
};

MIXDIFF_REGISTER(routers_registry(), "token_choice",
                 "top-K token choice: softmax|sigmoid scores, softmax before|after top-k, "
                 "normalize, scaling, group-limited (n_group, topk_group), null experts, balancer",
                 [](const ConfigNode& c, const RouterDims& d) -> std::shared_ptr<RouterBase> {
                   return std::make_shared<TokenChoiceRouter>(c, d);
                 });

}  // namespace
}  // namespace mixdiff
