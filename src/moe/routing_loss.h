// Routing losses (registry `routing_losses`): the contract of a loss on routing decisions, what it
// sees of one MoE layer's forward (RoutingRecord), and the per-step global-batch statistics that
// global-scope losses read (GlobalLoad, algorithms.md 6.2).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "core/config.h"
#include "core/registry.h"
#include "moe/context.h"
#include "moe/router.h"

namespace mixdiff {

class ExpertPool;

/// Per-step buffer of global-batch routing statistics (one per layer).
struct GlobalLoad {
  at::Tensor counts_S;    ///< unbiased top-K counts, summed over micro-batches (and ranks)
  at::Tensor prob_sum_S;  ///< sum of probs over real tokens, no grad (for the exact value)
  at::Tensor last_counts_S;  ///< the latest forward's counts alone (summed over ranks)
  double last_tokens = 0;    ///< the latest forward's real tokens (summed over ranks)
  double tokens = 0;      ///< real tokens (summed like the counts)
  int64_t micro = 0;      ///< forwards added this step
  void reset();
  /// N_S * sum_i f_i P_i with f = counts / sum(counts) and P = prob_sum / tokens: the
  /// global-batch LBL of everything added this step (1 at perfect balance).
  double value() const;
};

/// What a routing loss sees of one layer's forward.
struct RoutingRecord {
  const RoutingDecision& decision;
  const RoutingContext& ctx;
  ExpertPool& pool;
  const GlobalLoad& global;
  at::Tensor candidates_S;  ///< pool expert of each slot (undefined: identity)
  int64_t pool_users = 1;   ///< routed layers sharing `pool`
  const StatReducer* reduce = nullptr;  ///< sum over data-parallel ranks (null: one process)
};

/// Mean of a per-token quantity over the real tokens of `ctx` (padding excluded).
at::Tensor real_token_mean(const at::Tensor& v_T, const RoutingContext& ctx);

/// A loss on routing decisions, computed in each MoE layer from a RoutingRecord and attached to the
/// layer's output (moe_layer.h). Registry `routing_losses` (the recipe's `losses` list names them
/// beside the diffusion loss); one file each in losses/.
class RoutingLoss {
 public:
  virtual ~RoutingLoss() = default;
  /// Unweighted loss of one layer, differentiable in the router (and the experts for ERC).
  virtual at::Tensor layer_loss(const RoutingRecord& r) = 0;
  /// Why this loss cannot train `router` ("" when it can): checked against every MoE layer's router
  /// when the recipe is read.
  virtual std::string refuses(const RouterBase& router) const { return ""; }
};

using RoutingLossRegistry = Registry<std::shared_ptr<RoutingLoss>, const ConfigNode&>;
RoutingLossRegistry& routing_losses_registry();

struct WeightedRoutingLoss {
  std::string name;
  double weight = 1.0;
  std::shared_ptr<RoutingLoss> term;
};

}  // namespace mixdiff
