// What the MoE model kinds (models/*_dlm.cpp) read and build alike: the backbone options, the
// recipe's `model.moe` section with its block pattern, MoE options and router, and a
// TransformerDlm whose dense blocks are the backbone's SwiGLU (model.d_ff) and whose MoE blocks
// come from the model kind's own factory. A model kind then holds only what makes it different
// (UniPool's pool, ReXMoE's candidate sets, Chain-of-Experts' iterations).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "core/config.h"
#include "model/transformer.h"
#include "moe/moe_layer.h"

namespace mixdiff {

struct MoeModelRecipe {
  TransformerOptions backbone;
  ConfigNode moe;          ///< model.moe
  std::string pattern;     ///< one letter per block, D (dense) or M (MoE): read_block_pattern
  int64_t n_moe = 0;       ///< MoE blocks in the pattern
  MoeOptions options;      ///< n_expert, d_expert, shared experts, capacity, ...
  ConfigNode router;       ///< model.moe.router

  /// Reads `model` (with its `moe` section). `name` is the architecture's name in the error
  /// when the pattern has no MoE block.
  MoeModelRecipe(const ConfigNode& model, const std::string& name);
  /// A router of kind moe.router.kind choosing among `n_candidates` experts.
  std::shared_ptr<RouterBase> make_router(int64_t n_candidates) const;
  /// The model: block l is SwiGLU(d_model, d_ff) where the pattern says D, and moe_block(i) for
  /// the i-th MoE block (called once per MoE block, in block order) where it says M.
  std::shared_ptr<ModelBase> build(
      const std::function<std::shared_ptr<FeedForward>(int64_t moe_index)>& moe_block,
      std::string kind, const SharedModules& shared = {}) const;
};

}  // namespace mixdiff
