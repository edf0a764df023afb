// moe_dlm: the transformer diffusion LM of src/model/transformer.h with MoE feed-forwards
// (src/moe/moe_layer.h): fine-grained routed experts, optional shared experts (DeepSeekMoE,
// arXiv 2401.06066; algorithms.md 11.2), any router of the `routers` registry, optional
// capacity. Which blocks are MoE: all but the first `moe.first_k_dense` (DeepSeek/LLaDA2.0 keep
// the first block dense), or an explicit `moe.layer_pattern` of D (dense) and M (MoE), one letter
// per block. Dense blocks use the backbone's SwiGLU of width model.d_ff.
#include <torch/nn/module.h>

#include "core/errors.h"
#include "model/moe_model.h"

namespace mixdiff {
namespace {

std::shared_ptr<ModelBase> build(const ConfigNode& c) {
  const MoeModelRecipe r(c, "moe_dlm");
  return r.build(
      [&](int64_t) {
        return std::make_shared<MoeLayer>(r.options, r.make_router(r.options.n_expert));
      },
      "moe_dlm");
}

MIXDIFF_REGISTER(models_registry(), "moe_dlm",
                 "transformer dLLM with MoE feed-forwards (fine-grained + shared experts, any "
                 "router, first_k_dense / layer_pattern, dropless or capacity)",
                 [](const ConfigNode& c) { return build(c); });

}  // namespace
}  // namespace mixdiff
