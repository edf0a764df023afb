// The diffusion loss contract: a term of the training objective computed from the logits at the
// masked positions (registry `losses`: masked_diffusion_elbo, masked_ce; one file each in
// losses/). Losses on routing decisions have their own contract and registry
// (moe/routing_loss.h); a recipe's `losses` list names both kinds.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "core/config.h"
#include "core/registry.h"
#include "diffusion/diffusion.h"
#include "model/model.h"

namespace mixdiff {

/// A term of the training objective, computed from the logits at masked positions.
class LossTerm {
 public:
  virtual ~LossTerm() = default;
  /// Scalar loss. `out.logits` is [M, V] for the batch's masked positions.
  virtual at::Tensor compute(const ModelOutput& out, const DiffusionBatch& batch) = 0;
};

using LossRegistry = Registry<std::shared_ptr<LossTerm>, const ConfigNode&>;
LossRegistry& losses_registry();

}  // namespace mixdiff
