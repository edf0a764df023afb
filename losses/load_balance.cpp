// load_balance: the switch-style load-balancing loss N_S * sum_i f_i P_i (= 1 at perfect balance)
// in the three scopes of algorithms.md section 6 (Megatron-Core's aux_loss, seq_aux_loss,
// global_aux_loss), per MoE layer:
//   f_i  fraction of routed slots that chose slot i, counted from the unbiased, ungrouped top-K
//        of the probabilities (RoutingDecision::lb_map_TS; padding excluded), no gradient
//   P_i  mean routing probability of slot i over the real tokens (carries the gradient)
//   scope: micro     f and P over the micro-batch
//   scope: sequence  f and P per sequence, the loss averaged over sequences (DeepSeek-V2)
//   scope: global    f from the global batch: counts summed over all micro-batches of the
//                    optimizer step so far and over data-parallel ranks (GlobalLoad), P from the
//                    local tokens and normalised by the LOCAL token count, which is the corrected
//                    normalisation of algorithms.md 6.2 (no 1/DP factor under gradient averaging)
// N is the number of slots the router could choose (the visible ones when a candidate schedule
// hides some). Logged values are the unweighted loss averaged over layers, so 1.0 is balanced.
#include <torch/torch.h>

#include "core/errors.h"
#include "moe/moe_layer.h"

namespace mixdiff {
namespace {

class LoadBalance : public RoutingLoss {
 public:
  explicit LoadBalance(const ConfigNode& c) {
    scope_ = c.get_choice<Scope>(
        "scope",
        {{"micro", Scope::kMicro}, {"sequence", Scope::kSequence}, {"global", Scope::kGlobal}},
        Scope::kMicro);
  }

  at::Tensor layer_loss(const RoutingRecord& r) override {
    const auto& d = r.decision;
    const int64_t T = d.probs_TS.size(0);
    // N: the slots the router could choose (only the visible ones under a candidate schedule).
    const int64_t S = d.n_visible > 0 ? d.n_visible : d.probs_TS.size(1);
    const int64_t W = d.probs_TS.size(1);
    auto w_T = valid_weights(r.ctx.valid_T, T, d.probs_TS.device());
    auto pw_TS = d.probs_TS * w_T.unsqueeze(1);
    if (scope_ == Scope::kSequence) {
      TORCH_CHECK(r.ctx.seq_T.defined() && r.ctx.n_seq > 0,
                  "[load_balance] scope: sequence needs the sequence ids of the tokens");
      const int64_t B = r.ctx.n_seq;
      auto seq_T = r.ctx.seq_T.to(d.probs_TS.device());
      auto c_BS = torch::zeros({B, W}, d.probs_TS.options()).index_add(0, seq_T, d.lb_map_TS);
      auto p_BS = torch::zeros({B, W}, d.probs_TS.options()).index_add(0, seq_T, pw_TS);
      auto n_B = torch::zeros({B}, w_T.options()).index_add(0, seq_T, w_T);
      auto has_B = (n_B > 0).to(torch::kFloat32);
      auto f_BS = c_BS / c_BS.sum(1, true).clamp_min(1.0);
      auto P_BS = p_BS / n_B.clamp_min(1.0).unsqueeze(1);
      auto per_seq_B = (f_BS * P_BS).sum(1) * static_cast<double>(S);
      return (per_seq_B * has_B).sum() / has_B.sum().clamp_min(1.0);
    }
    at::Tensor counts_S = scope_ == Scope::kGlobal && r.global.counts_S.defined()
                              ? r.global.counts_S
                              : d.lb_map_TS.sum(0);
    auto f_S = counts_S / counts_S.sum().clamp_min(1.0);
    auto P_S = pw_TS.sum(0) / w_T.sum().clamp_min(1.0);
    return (f_S * P_S).sum() * static_cast<double>(S);
  }

 private:
  enum class Scope { kMicro, kSequence, kGlobal };
  Scope scope_ = Scope::kMicro;
};

MIXDIFF_REGISTER(routing_losses_registry(), "load_balance",
                 "MoE load-balancing loss N * sum f_i P_i; scope: micro|sequence|global "
                 "(global: counts over the whole step's micro-batches and ranks)",
                 [](const ConfigNode& c) -> std::shared_ptr<RoutingLoss> {
                   return std::make_shared<LoadBalance>(c);
                 });

}  // namespace
}  // namespace mixdiff
