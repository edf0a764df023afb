// Block-level routing (algorithms.md section 10). In block diffusion decoding every forward
// processes a whole block and token-level routing touches up to min(B K, E) distinct experts per
// layer, which makes decoding memory-bound. A block routing policy (registry `block_routing`)
// picks, per block and per MoE layer, the experts (a "coreset") that the block's tokens may use;
// each token then routes as usual inside it. The MoE layer first routes the block's tokens
// without restriction (a probe: no routing state changes), hands that to the policy, then routes
// again within the coreset. With a coreset that holds every expert a policy is token-level routing.
// Policies live in routers/block_routing.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>

#include "core/config.h"
#include "core/registry.h"
#include "moe/router.h"

namespace mixdiff {

struct BlockRoutingInput {
  const RoutingDecision& token_level;  ///< the unrestricted routing of the forward's tokens
  const at::Tensor& block_T;           ///< int64 [T] block id of each token
  int64_t layer = 0;                   ///< transformer block of the router
  int64_t iteration = 0;               ///< Chain-of-Experts iteration (0 for a plain MoE layer)
  int64_t step = 0;                    ///< denoising step inside the block (inference; 0 for a
                                       ///< validation forward) or optimizer step (training)
  at::Tensor valid_T = {};             ///< bool [T], false at padding (never votes); undefined:
                                       ///< every token is real
};

class BlockRoutingPolicy {
 public:
  virtual ~BlockRoutingPolicy() = default;
  /// bool [T, S] slots each token may use (its block's coreset); undefined: no restriction.
  virtual at::Tensor allowed(const BlockRoutingInput& in) = 0;
  /// Forget remembered coresets (a new generation).
  virtual void reset() {}
  /// False for token-level routing (the layer then skips the probe pass).
  virtual bool restricts() const { return true; }
  virtual std::string describe() const = 0;
};

using BlockRoutingRegistry = Registry<std::shared_ptr<BlockRoutingPolicy>, const ConfigNode&>;
BlockRoutingRegistry& block_routing_registry();

/// A recipe's block routing section: {kind, block_size (32), ...policy keys}. kind `token` gives
/// a null policy.
struct BlockRoutingConfig {
  std::shared_ptr<BlockRoutingPolicy> policy;
  int64_t block_size = 32;
  std::string kind = "token";
  static BlockRoutingConfig from(const ConfigNode& c);
};

/// Per block: the distinct block ids of `block_T` (sorted) and each token's index into them.
std::pair<at::Tensor, at::Tensor> block_index(const at::Tensor& block_T);

}  // namespace mixdiff
