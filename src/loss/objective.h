// The diffusion objective (registry `objectives`, recipe key diffusion.objective): how a training
// micro-batch is noised and fed to the model, and which validation bound matches it. One file each
// in losses/:
//   masked  one t per sequence (MDLM, LLaDA): the model sees x_t
//   block   BD3-LM: one t per block of diffusion.block_size, the vectorised [x_t ; x_0] forward
//           with BD3's attention mask; the model must be block-causal with the same block size
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "core/config.h"
#include "core/registry.h"
#include "diffusion/diffusion.h"
#include "model/model.h"

namespace mixdiff {

class DiffusionObjective {
 public:
  virtual ~DiffusionObjective() = default;
  /// The noise of one micro-batch of x0_BL on data-parallel rank `rank` of `world` (host tensors;
  /// training_noise with this objective's blocks); `maskable_BL` (optional): the positions that
  /// may be masked (SFT data: the responses).
  virtual DiffusionBatch noise(const at::Tensor& x0_BL, const NoiseSchedule& schedule,
                               int64_t mask_id, at::Generator& gen, int64_t world, int64_t rank,
                               const at::Tensor& maskable_BL) const = 0;
  DiffusionBatch noise(const at::Tensor& x0_BL, const NoiseSchedule& schedule, int64_t mask_id,
                       at::Generator& gen, int64_t world, int64_t rank) const {
    return noise(x0_BL, schedule, mask_id, gen, world, rank, at::Tensor());
  }
  /// The model input of a noised batch (batch and x0_BL on the model's device).
  virtual ModelInput input(const DiffusionBatch& batch, const at::Tensor& x0_BL) const = 0;
  /// Block size of the validation bound (validation_nelbo's bd3_block; 0: the masked bound).
  virtual int64_t validation_block() const = 0;
  /// Why `model` cannot be trained with this objective ("" when it can).
  virtual std::string refuses(const ModelBase& model) const { return ""; }
  virtual std::string name() const = 0;
};

/// Factories take the recipe's `diffusion` section.
using ObjectiveRegistry = Registry<std::shared_ptr<DiffusionObjective>, const ConfigNode&>;
ObjectiveRegistry& objectives_registry();

}  // namespace mixdiff
