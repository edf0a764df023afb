// Masked-diffusion loss terms (registry `losses`; algorithms.md 1.2, 1.8, 12.7).
//   masked_diffusion_elbo  LLaDA pre-training loss: sum over masked tokens of CE / p_b,
//                          normalised by B * L (all token slots, not the masked count).
//   masked_ce              unweighted mean CE over masked tokens (dFactory / EC-DLM "stable
//                          training"): no 1/t weight, normalised by the masked count.
#include <torch/torch.h>

#include "diffusion/diffusion.h"
#include "loss/loss.h"

namespace mixdiff {
namespace {

class MaskedDiffusionElbo : public LossTerm {
 public:
  at::Tensor compute(const ModelOutput& out, const DiffusionBatch& b) override {
    if (b.index_M.numel() == 0) return out.logits.sum() * 0.0;  // keeps the graph connected
    auto ce_M = masked_cross_entropy(out.logits, b.target_M);  // on the logits' device
    return (ce_M * b.weight_M.to(ce_M.device())).sum() / static_cast<double>(b.n_slots);
  }
};

class MaskedCe : public LossTerm {
 public:
  at::Tensor compute(const ModelOutput& out, const DiffusionBatch& b) override {
    if (b.index_M.numel() == 0) return out.logits.sum() * 0.0;
    return masked_cross_entropy(out.logits, b.target_M).mean();
  }
};

MIXDIFF_REGISTER(losses_registry(), "masked_diffusion_elbo",
                 "LLaDA ELBO: sum of masked CE / p_b over B*L (1/t-weighted)",
                 [](const ConfigNode&) -> std::shared_ptr<LossTerm> {
                   return std::make_shared<MaskedDiffusionElbo>();
                 });
MIXDIFF_REGISTER(losses_registry(), "masked_ce",
                 "unweighted mean CE over masked tokens (no 1/t; dFactory-style stable loss)",
                 [](const ConfigNode&) -> std::shared_ptr<LossTerm> {
                   return std::make_shared<MaskedCe>();
                 });

}  // namespace
}  // namespace mixdiff
