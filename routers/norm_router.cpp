// norm_router: UniPool's NormRouter (arXiv 2605.06665; algorithms.md 2.2). Per layer, logits
// Z = x W^T (fp32) over the layer's slots; slots the layer may not see are set to 0 BEFORE the
// row-wise L2 normalisation (never -inf there: squaring would overflow); then
//   S = relu(Z / (||Z||_2 + 1e-8)) * a * c0
// with a learnable per-layer scale `a` (parameter `scale`, init 1) and the constant
// c0 = E_{x ~ N(0, I_S)} [ 1 / ||topK(relu(x / ||x||))||_2 ] estimated by Monte-Carlo (1e5 samples,
// fixed seed; draws with no positive coordinate are left out; `init: one` sets c0 = 1), so the
// selected scores have about unit norm at init.
// Selection: top-K of S (+ a balancer's offset), invisible slots -inf; gates are the raw S of the
// chosen slots: no softmax, no renormalisation (optional `scaling`). The balancing losses see
// S / sum(S); the pool-level loss reads the raw S (RoutingDecision::scores_TS).
#include <torch/torch.h>

#include <limits>
#include <map>
#include <mutex>

#include "core/errors.h"
#include "moe/router.h"

namespace mixdiff {
namespace {

/// c0 for (S, K), cached: the same for every layer of a model.
double monte_carlo_c0(int64_t S, int64_t K) {
  static std::mutex mu;
  static std::map<std::pair<int64_t, int64_t>, double> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({S, K});
  if (it != cache.end()) return it->second;
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(20260526);
  const int64_t total = 100000, chunk = 10000;
  double sum = 0;
  int64_t kept = 0;
  for (int64_t done = 0; done < total; done += chunk) {
    auto x = torch::randn({chunk, S}, gen);
    auto r = torch::relu(x / x.norm(2, -1, true));
    auto n = std::get<0>(r.topk(K, -1)).norm(2, -1);
    // A draw with every coordinate negative has no positive score at all (probability 2^-S);
    // it is left out, as it routes nothing.
    auto ok = n > 0;
    sum += (1.0 / n.masked_select(ok)).sum().item<double>();
    kept += ok.sum().item<int64_t>();
  }
  const double c0 = sum / static_cast<double>(std::max<int64_t>(kept, 1));
  cache.emplace(std::make_pair(S, K), c0);
  return c0;
}

class NormRouter : public RouterBase {
 public:
  NormRouter(const ConfigNode& c, const RouterDims& dims) : n_expert_(dims.n_expert) {
    top_k_ = c.get<int64_t>("top_k");
    if (top_k_ <= 0 || top_k_ > n_expert_) {
      c.fail("top_k", str("expected 1..", n_expert_, ", got ", top_k_));
    }
    const std::string init = c.get<std::string>("init", "monte_carlo");
    if (init != "monte_carlo" && init != "one") {
      c.fail("init", "expected monte_carlo or one, got '" + init + "'");
    }
    c0_ = init == "one" ? 1.0 : monte_carlo_c0(n_expert_, top_k_);
    scaling_ = c.get<double>("scaling", 1.0);
    if (!(scaling_ > 0)) c.fail("scaling", "expected a positive factor");
    weight_ = register_parameter("weight", torch::empty({n_expert_, dims.d_model}));
    scale_ = register_parameter("scale", torch::ones({1}));
    {
      torch::NoGradGuard ng;
      weight_.normal_(0.0, 0.02);
    }
    if (auto b = build_balancer(c.section("balancer"), n_expert_)) {
      balancer_ = register_module("balancer", std::move(b));
    }
  }

  RoutingDecision route(const at::Tensor& x_TD, const RoutingContext& ctx) override {
    const int64_t S = n_expert_, K = top_k_;
    RoutingDecision d;
    d.n_expert = S;
    d.top_k = K;
    d.weight_SD = weight_;
    d.logits_TS = router_logits_fp32(x_TD, weight_);
    const at::Tensor vis_S = hide_invisible_slots(d, ctx, S, 0.0);  // before the norm, never -inf
    TORCH_CHECK(!vis_S.defined() || d.n_visible >= K, "[norm_router] ", d.n_visible,
                " visible slots for top-", K);
    const at::Tensor z_TS = d.logits_TS;
    auto s_TS =
        torch::relu(z_TS / (z_TS.norm(2, -1, true) + 1e-8)) * scale_.to(torch::kFloat32) * c0_;
    d.scores_TS = s_TS;
    d.probs_TS = s_TS / (s_TS.sum(-1, true) + 1e-20);
    const bool update = updates_state(*this, ctx);
    at::Tensor idx_TK;
    {
      torch::NoGradGuard ng;
      at::Tensor sel_TS = s_TS.detach();
      if (balancer_) {
        sel_TS = sel_TS + balancer_->offset(sel_TS, K, ctx.valid_T, update).unsqueeze(0);
      }
      if (vis_S.defined()) {
        sel_TS = sel_TS.masked_fill(vis_S.logical_not(), -std::numeric_limits<float>::infinity());
      }
      sel_TS = restrict_to_allowed(sel_TS, ctx, S);
      idx_TK = topk_indices(sel_TS, K);
      auto unbiased_TS =
          vis_S.defined() ? s_TS.detach().masked_fill(vis_S.logical_not(), -1.0) : s_TS.detach();
      const bool plain = !balancer_ && !vis_S.defined() && !ctx.allowed_TS.defined();
      d.lb_map_TS = selection_map(plain ? idx_TK : topk_indices(unbiased_TS, K), S,
                                  ctx.valid_T);
      if (balancer_ && update) balancer_->observe(slot_counts(idx_TK, S, ctx.valid_T));
    }
    auto gate_TK = s_TS.gather(1, idx_TK);
    if (scaling_ != 1.0) gate_TK = gate_TK * scaling_;
    fill_assignments(d, idx_TK, gate_TK, ctx.valid_T);
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
  int64_t top_k() const override { return top_k_; }
  bool scores_from_normalised_logits() const override { return true; }
  std::string describe() const override {
    return str("norm_router top-", top_k_, " (c0 ", format_double(c0_), ")",
               balancer_ ? ", " + balancer_->describe() : "");
  }

 private:
  int64_t n_expert_, top_k_ = 1;
  double c0_ = 1.0, scaling_ = 1.0;
  at::Tensor weight_, scale_;
  std::shared_ptr<Balancer> balancer_;
};

MIXDIFF_REGISTER(routers_registry(), "norm_router",
                 "UniPool NormRouter: relu(L2-normalised logits) * learnable scale * c0, raw "
                 "scores as gates; keys: top_k, init (monte_carlo|one), scaling, balancer",
                 [](const ConfigNode& c, const RouterDims& d) -> std::shared_ptr<RouterBase> {
                   return std::make_shared<NormRouter>(c, d);
                 });

}  // namespace
}  // namespace mixdiff
