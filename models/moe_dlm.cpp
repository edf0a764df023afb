// moe_dlm: the transformer diffusion LM of src/model/transformer.h with MoE feed-forwards
// (src/moe/moe_layer.h): fine-grained routed experts, optional shared experts (DeepSeekMoE,
// arXiv 2401.06066; algorithms.md 11.2), any router of the `routers` registry, optional
// capacity. Which blocks are MoE: all but the first `moe.first_k_dense` (DeepSeek/LLaDA2.0 keep
// the first block dense), or an explicit `moe.layer_pattern` of D (dense) and M (MoE), one letter
// per block. Dense blocks use the backbone's SwiGLU of width model.d_ff.
#include <torch/nn/module.h>

#include "core/errors.h"
#include "model/transformer.h"
#include "moe/moe_layer.h"

namespace mixdiff {
namespace {

std::shared_ptr<ModelBase> build(const ConfigNode& c) {
  const TransformerOptions o = TransformerOptions::from(c);
  ConfigNode moe = c.at("moe");
  const MoeOptions mo = MoeOptions::from(moe, o.d_model);
  const std::string pattern = read_block_pattern(moe, o.n_layer);
  ConfigNode router_cfg = moe.at("router");
  const std::string router_kind = router_cfg.get<std::string>("kind");
  const RouterDims dims{o.d_model, mo.n_expert};
  return std::make_shared<TransformerDlm>(
      o,
      [&](int64_t layer) -> std::shared_ptr<FeedForward> {
        if (pattern[static_cast<size_t>(layer)] == 'D') {
          return std::make_shared<SwiGLU>(o.d_model, o.d_ff);
        }
        auto router = routers_registry().create(router_kind, router_cfg.path() + ".kind",
                                                router_cfg, dims);
        return std::make_shared<MoeLayer>(mo, std::move(router));
      },
      "moe_dlm");
}

MIXDIFF_REGISTER(models_registry(), "moe_dlm",
                 "transformer dLLM with MoE feed-forwards (fine-grained + shared experts, any "
                 "router, first_k_dense / layer_pattern, dropless or capacity)",
                 [](const ConfigNode& c) { return build(c); });

}  // namespace
}  // namespace mixdiff
