// The masked-diffusion objective (MDLM, LLaDA; algorithms.md 1.2): one t per sequence, the model
// sees x_t and returns logits at the masked positions.
#include <torch/torch.h>

#include "loss/objective.h"

namespace mixdiff {
namespace {

class MaskedObjective : public DiffusionObjective {
 public:
  DiffusionBatch noise(const at::Tensor& x0_BL, const NoiseSchedule& schedule, int64_t mask_id,
                       at::Generator& gen, int64_t world, int64_t rank,
                       const at::Tensor& maskable_BL) const override {
    return training_noise(x0_BL, schedule, mask_id, gen, world, rank, /*block=*/0, maskable_BL);
  }
  ModelInput input(const DiffusionBatch& batch, const at::Tensor&) const override {
    return ModelInput(batch.xt_BL, batch.index_M);
  }
  int64_t validation_block() const override { return 0; }
  std::string name() const override { return "masked"; }
};

MIXDIFF_REGISTER(objectives_registry(), "masked",
                 "masked diffusion (MDLM, LLaDA): one t per sequence, the model sees x_t (default)",
                 [](const ConfigNode&) -> std::shared_ptr<DiffusionObjective> {
                   return std::make_shared<MaskedObjective>();
                 });

}  // namespace
}  // namespace mixdiff
