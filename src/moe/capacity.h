// Capacity schedules of expert-choice routing over the mask ratio (EC-DLM, arXiv 2604.01622;
// algorithms.md 9.2). A schedule maps the realised mask ratio r of a sequence to a factor
// phi(r) in [0, 1]; the sequence's nominal experts per token is
//   k(r) = clamp(round(k_min + (k_max - k_min) phi(r)), k_min, k_max)
// and each expert takes C = max(1, floor(L k(r) / E)) of its L tokens. Registry
// `capacity_schedules`: constant, linear, linear_reverse, cosine, cosine_reverse, bell,
// bell_gaussian, bell_gaussian_reverse.
//
// Matched FLOPs: with `k_target`, the window [k_min, k_max] is shifted (its width kept) so that
// the mean of k(r) over r ~ U(0, 1) (what the masked-diffusion forward process gives) equals
// k_target, the budget of a constant-k router.
#pragma once

#include <memory>
#include <string>

#include "core/config.h"
#include "core/registry.h"

namespace mixdiff {

class CapacitySchedule {
 public:
  virtual ~CapacitySchedule() = default;
  /// phi(r) in [0, 1] for a mask ratio r in [0, 1].
  virtual double phi(double r) const = 0;
  /// Nominal experts per token at mask ratio r (see the header comment).
  double k(double r) const;
  /// Mean of k(r) over r ~ U(0, 1) (numerical, 20001 points).
  double mean_k() const;
  double k_min = 1, k_max = 1;
  std::string name;
};

using CapacityScheduleRegistry = Registry<std::shared_ptr<CapacitySchedule>, const ConfigNode&>;
CapacityScheduleRegistry& capacity_schedules_registry();

/// Builds `cfg` (kind, k_min, k_max or k for constant, optional k_target, sigma).
std::shared_ptr<CapacitySchedule> build_capacity_schedule(const ConfigNode& cfg);

}  // namespace mixdiff
