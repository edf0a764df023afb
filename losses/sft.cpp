// LLaDA's SFT loss (arXiv 2502.09992 Eq. 5; algorithms.md 1.3) on prompt/response data
// (data.kind: sft_jsonl): the forward process masks response positions only (the prompt stays
// clean, the EOS padding after the response is part of it and is learned), and each masked
// token's ELBO-weighted cross-entropy is normalised by its row's response length:
//   L_sft = (1/B) sum_b sum_{i masked in b} w_b CE_{b,i} / |response_b|,   w_b = 1/p_b (1/t).
// Its expectation over t and the mask is the row's response NELBO per response token, averaged
// over rows. (dFactory's SFT loss, the plain mean CE over masked tokens, is `masked_ce`.)
#include <torch/torch.h>

#include "core/errors.h"
#include "diffusion/diffusion.h"
#include "loss/loss.h"

namespace mixdiff {
namespace {

class SftElbo : public LossTerm {
 public:
  at::Tensor compute(const ModelOutput& out, const DiffusionBatch& b) override {
    if (!b.response_len_B.defined()) {
      throw ConfigError("losses: sft_elbo needs prompt/response data (data.kind: sft_jsonl); "
                        "use masked_diffusion_elbo for pre-training windows");
    }
    if (b.index_M.numel() == 0) return out.logits.sum() * 0.0;  // keeps the graph connected
    auto ce_M = masked_cross_entropy(out.logits, b.target_M);
    const auto dev = ce_M.device();
    auto len_M = b.response_len_B.to(dev).index_select(0, b.row_M.to(dev)).clamp_min(1.0);
    const double B = static_cast<double>(b.response_len_B.size(0));
    return (ce_M * b.weight_M.to(dev) / len_M).sum() / B;
  }
};

MIXDIFF_REGISTER(losses_registry(), "sft_elbo",
                 "LLaDA SFT loss: masked CE / p_b over each row's response length, mean over rows "
                 "(needs data.kind: sft_jsonl)",
                 [](const ConfigNode&) -> std::shared_ptr<LossTerm> {
                   return std::make_shared<SftElbo>();
                 });

}  // namespace
}  // namespace mixdiff
