#include "moe/router.h"

#include "nn/checkpoint.h"

#include <torch/torch.h>

#include <limits>

namespace mixdiff {

RouterRegistry& routers_registry() {
  static RouterRegistry r("routers", "MoE routers (model.moe.router.kind)");
  return r;
}

BalancerRegistry& balancers_registry() {
  static BalancerRegistry r("balancers",
                            "selection offsets that balance expert load without a loss "
                            "(model.moe.router.balancer.kind; none disables)");
  return r;
}

std::shared_ptr<Balancer> build_balancer(const ConfigNode& cfg, int64_t n_slots) {
  const std::string kind = cfg.get<std::string>("kind", "none");
  if (kind == "none") return nullptr;
  return balancers_registry().create(kind, cfg.path() + ".kind", cfg, n_slots);
}

at::Tensor topk_indices(const at::Tensor& scores, int64_t k) {
  const int64_t S = scores.size(-1);
  TORCH_CHECK(k > 0 && k <= S, "[topk_indices] k = ", k, " outside [1, ", S, "]");
  // A partial top-k is much cheaper than a full sort of every row. Ties that straddle the k-th
  // place are resolved by a stable full sort (rare for continuous scores); ties inside the
  // chosen k are put in (value desc, index asc) order, so the result is the same on every
  // device and every LibTorch version.
  auto top = scores.topk(k, -1, /*largest=*/true, /*sorted=*/true);
  auto vals = std::get<0>(top), idx = std::get<1>(top);
  if (k < S) {
    auto kth = vals.narrow(-1, k - 1, 1);
    if (((scores == kth).sum(-1) != (vals == kth).sum(-1)).any().item<bool>()) {
      auto sorted = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
      return sorted.narrow(-1, 0, k).contiguous();
    }
  }
  if (k == 1) return idx.contiguous();
  auto asc = std::get<1>(idx.sort(-1));  // positions of idx in ascending expert order
  auto idx_asc = idx.gather(-1, asc), vals_asc = vals.gather(-1, asc);
  auto order = std::get<1>(vals_asc.sort(/*stable=*/true, -1, /*descending=*/true));
  return idx_asc.gather(-1, order).contiguous();
}

bool updates_state(const torch::nn::Module& m, const RoutingContext& ctx) {
  if (!m.is_training() || ctx.probe) return false;
  switch (recompute_pass()) {
    case RecomputePass::kFirst: return true;  // a checkpointed region's first forward (no grad)
    case RecomputePass::kRecompute: return false;
    case RecomputePass::kNone: break;
  }
  return at::GradMode::is_enabled();
}

at::Tensor restrict_to_allowed(const at::Tensor& sel, const RoutingContext& ctx, int64_t n_real) {
  if (!ctx.allowed_TS.defined()) return sel;
  auto allowed_TS = ctx.allowed_TS.to(sel.device());
  if (sel.size(1) > n_real) {
    allowed_TS = torch::cat(
        {allowed_TS, torch::ones({sel.size(0), sel.size(1) - n_real}, allowed_TS.options())}, 1);
  }
  return sel.masked_fill(allowed_TS.logical_not(), -std::numeric_limits<float>::infinity());
}

at::Tensor valid_weights(const at::Tensor& valid_T, int64_t T, const at::Device& device) {
  if (!valid_T.defined()) return torch::ones({T}, torch::TensorOptions(torch::kFloat32).device(device));
  return valid_T.to(device, torch::kFloat32);
}

at::Tensor router_logits_fp32(const at::Tensor& x_TD, const at::Tensor& weight_SD) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return torch::nn::functional::linear(x_TD.to(torch::kFloat32), weight_SD.to(torch::kFloat32));
}

at::Tensor hide_invisible_slots(RoutingDecision& d, const RoutingContext& ctx, int64_t n_real,
                                double fill) {
  at::Tensor vis_S = slot_visibility(ctx, n_real, d.logits_TS.size(1));
  if (!vis_S.defined()) return vis_S;
  vis_S = vis_S.to(d.logits_TS.device());
  d.logits_TS = d.logits_TS.masked_fill(vis_S.logical_not(), fill);
  d.n_visible = vis_S.sum().item<int64_t>();
  return vis_S;
}

at::Tensor slot_counts(const at::Tensor& idx_TK, int64_t n_slots, const at::Tensor& valid_T) {
  return selection_map(idx_TK, n_slots, valid_T).sum(0);
}

at::Tensor selection_map(const at::Tensor& idx_TK, int64_t n_slots, const at::Tensor& valid_T) {
  torch::NoGradGuard ng;
  const int64_t T = idx_TK.size(0);
  auto map_TS = torch::zeros({T, n_slots}, idx_TK.options().dtype(torch::kFloat32));
  map_TS.scatter_(1, idx_TK, 1.0);
  if (valid_T.defined()) map_TS.mul_(valid_T.to(map_TS.device(), torch::kFloat32).unsqueeze(1));
  return map_TS;
}

at::Tensor slot_visibility(const RoutingContext& ctx, int64_t n_real, int64_t n_slots) {
  if (!ctx.visible_S.defined()) return {};
  TORCH_CHECK(ctx.visible_S.size(0) == n_real, "[router] visibility over ", ctx.visible_S.size(0),
              " slots for a router of ", n_real);
  if (n_slots == n_real) return ctx.visible_S;
  return torch::cat({ctx.visible_S, torch::ones({n_slots - n_real}, ctx.visible_S.options())});
}

void fill_assignments(RoutingDecision& d, const at::Tensor& idx_TK, const at::Tensor& gate_TK,
                      const at::Tensor& valid_T) {
  const int64_t T = idx_TK.size(0), K = idx_TK.size(1);
  auto token = torch::arange(T, idx_TK.options().dtype(torch::kLong))
                   .unsqueeze(1)
                   .expand({T, K})
                   .reshape({-1});  // [T * K]: every (token, slot) pair, row-major
  auto expert = idx_TK.reshape({-1});
  auto gate = gate_TK.reshape({-1});
  auto keep = expert < d.n_expert;
  if (valid_T.defined()) {
    keep = keep & valid_T.to(keep.device()).unsqueeze(1).expand({T, K}).reshape({-1});
  }
  if (keep.all().item<bool>()) {
    d.token_A = token.contiguous();
    d.expert_A = expert.contiguous();
    d.gate_A = gate;
    return;
  }
  auto pos_A = keep.nonzero().squeeze(1);
  d.token_A = token.index_select(0, pos_A);
  d.expert_A = expert.index_select(0, pos_A);
  d.gate_A = gate.index_select(0, pos_A);
}

}  // namespace mixdiff
