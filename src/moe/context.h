// Data-parallel hooks of routing state (global-batch counts, balancer statistics). The routing
// context itself (what a router may condition on) is nn/routing_context.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

#include "nn/routing_context.h"

namespace mixdiff {

/// Sums a statistics tensor over data-parallel ranks in place (identity in one process). Routing
/// state that every rank must share (global-batch counts, expert-bias counts) goes through it.
using StatReducer = std::function<void(at::Tensor&)>;

/// Concatenates along dim 0, in rank order, the tensors of one shape that every data-parallel
/// rank passes (identity in one process): what a balancer that solves over the global batch
/// (BIP) needs.
using StatGatherer = std::function<at::Tensor(const at::Tensor&)>;

/// The ranks whose training forwards form one global batch, for decisions taken over it (an
/// expert's capacity counted over the global token set): this rank's place and the two hooks
/// above. The default is one process alone.
struct RankScope {
  int rank = 0;
  int world = 1;
  StatReducer sum;
  StatGatherer gather;
};

}  // namespace mixdiff
