// The router contract of MixDiff's MoE layers (design.md "Main interfaces"; algorithms.md
// sections 0 and 12.1). A router maps the tokens entering a layer to sparse assignments
// (token, expert, gate) that cover token choice (A = T * K) and expert choice (A = E * C),
// plus the full fp32 scores for auxiliary losses and statistics. Router math is fp32 always.
// Concrete routers live in routers/, one file each, registered under `routers`.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>

#include "core/config.h"
#include "core/registry.h"

namespace mixdiff {

/// What a router may condition on. Undefined tensors mean "not available".
struct RoutingContext {
  int64_t layer = -1;
  at::Tensor mask_ratio_B;  ///< fp32 fraction of [MASK] per sequence (diffusion time proxy)
  at::Tensor is_masked_T;   ///< bool, token currently holds [MASK]
  at::Tensor seq_T;         ///< int64 sequence index of each token (routing groups)
  int64_t step = 0;         ///< optimizer step (training) or denoising step (inference)
};

/// Sparse assignments in COO form.
struct RoutingDecision {
  at::Tensor token_A;   ///< int64 in [0, T)
  at::Tensor expert_A;  ///< int64 in [0, E)
  at::Tensor gate_A;    ///< fp32 combine weight
  at::Tensor logits_TE; ///< fp32 router logits
  at::Tensor probs_TE;  ///< fp32 scores (softmax or sigmoid) for losses and statistics
};

/// Sizes a router needs from its layer.
struct RouterDims {
  int64_t d_model = 0;
  int64_t n_expert = 0;
};

class RouterBase : public torch::nn::Module {
 public:
  /// x_TD [T, D] -> assignments; logits in fp32.
  virtual RoutingDecision route(const at::Tensor& x_TD, const RoutingContext& ctx) = 0;
};

using RouterRegistry =
    Registry<std::shared_ptr<RouterBase>, const ConfigNode&, const RouterDims&>;
RouterRegistry& routers_registry();

}  // namespace mixdiff
