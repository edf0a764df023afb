// The block-diffusion objective (BD3-LM, arXiv 2503.09573; algorithms.md 1.6): one t per block of
// diffusion.block_size positions, and the vectorised [x_t ; x_0] forward of length 2 L with BD3's
// attention mask, so that each noisy block attends to itself and to the clean earlier blocks. The
// model must be block-causal with the same block size (it decodes block by block).
#include <torch/torch.h>

#include "core/errors.h"
#include "loss/objective.h"
#include "nn/layers.h"

namespace mixdiff {
namespace {

class BlockObjective : public DiffusionObjective {
 public:
  explicit BlockObjective(const ConfigNode& c) : block_(c.get<int64_t>("block_size", 32)) {
    if (block_ <= 0) c.fail("block_size", "expected a positive block size");
  }
  DiffusionBatch noise(const at::Tensor& x0_BL, const NoiseSchedule& schedule, int64_t mask_id,
                       at::Generator& gen, int64_t world, int64_t rank,
                       const at::Tensor& maskable_BL) const override {
    return training_noise(x0_BL, schedule, mask_id, gen, world, rank, block_, maskable_BL);
  }
  ModelInput input(const DiffusionBatch& batch, const at::Tensor& x0_BL) const override {
    const int64_t L = x0_BL.size(1);
    ModelInput in(torch::cat({batch.xt_BL, x0_BL}, 1), batch.index_M);  // [B, 2L]
    in.attn_bias = bd3_training_bias(L, block_).to(x0_BL.device());
    auto pos_L = torch::arange(L, torch::kLong);
    in.positions_L = torch::cat({pos_L, pos_L}).to(x0_BL.device());  // both halves at 0..L-1
    in.noisy_len = L;  // routing's mask ratio: the noisy half's
    return in;
  }
  int64_t validation_block() const override { return block_; }
  std::string refuses(const ModelBase& model) const override {
    if (model.attention() == "block_causal" && model.attention_block() == block_) return "";
    return str("block diffusion trains a block-causal model with the same block size: set "
               "model.attention: block_causal and model.block_size: ", block_);
  }
  std::string name() const override { return "block"; }

 private:
  int64_t block_;
};

MIXDIFF_REGISTER(objectives_registry(), "block",
                 "block diffusion (BD3-LM): one t per block of diffusion.block_size (32), the "
                 "[x_t ; x_0] forward with BD3's mask; needs a block-causal model",
                 [](const ConfigNode& c) -> std::shared_ptr<DiffusionObjective> {
                   return std::make_shared<BlockObjective>(c);
                 });

}  // namespace
}  // namespace mixdiff
