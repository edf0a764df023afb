// Optimizers and learning-rate schedules, built by name (registries `optimizers`,
// `lr_schedules`; recipe keys optim.kind and lr_schedule.kind).
#pragma once

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <vector>

#include "core/config.h"
#include "core/registry.h"

namespace mixdiff {

using OptimizerRegistry =
    Registry<std::unique_ptr<torch::optim::Optimizer>, const ConfigNode&, torch::nn::Module&>;
OptimizerRegistry& optimizers_registry();

/// The global L2 norm of the gradients of `params` (NaN/Inf when any gradient is).
double global_grad_norm(const std::vector<at::Tensor>& params);

/// torch::nn::utils::clip_grad_norm_'s factor for gradients of global norm `norm` clipped to
/// `max_norm` (1 when not clipping: max_norm <= 0 or norm already below it).
double clip_coefficient(double max_norm, double norm);

/// Scales the gradients of `params` (global norm `norm`) to norm `max_norm` when above it (no
/// clipping when max_norm <= 0), as torch::nn::utils::clip_grad_norm_ does, steps the
/// optimizer and sets the gradients to none. The fused AdamW applies the factor in its update.
void clip_step_zero(torch::optim::Optimizer& opt, const std::vector<at::Tensor>& params,
                    double max_norm, double norm);

/// Multiplier of the optimizer's base learning rate at (0-based) step `step`.
class LrSchedule {
 public:
  virtual ~LrSchedule() = default;
  virtual double factor(int64_t step) const = 0;
};

using LrScheduleRegistry =
    Registry<std::shared_ptr<LrSchedule>, const ConfigNode&, int64_t /*total_steps*/>;
LrScheduleRegistry& lr_schedules_registry();

}  // namespace mixdiff
