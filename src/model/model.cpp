#include "model/model.h"

#include "moe/moe_layer.h"

#include <torch/nn/module.h>

#include "moe/block_routing.h"

#include <unordered_set>

namespace mixdiff {

ModelRegistry& models_registry() {
  static ModelRegistry r("models", "model architectures (recipe key model.kind)");
  return r;
}

std::shared_ptr<ModelBase> build_model(const ConfigNode& model_cfg) {
  auto m = models_registry().create(model_cfg.get<std::string>("kind"), model_cfg.path() + ".kind",
                                    model_cfg);
  // Trained block routing (dMoE): the same policy in training and, by default, at inference.
  if (model_cfg.has("moe") && model_cfg.at("moe").has("block_routing")) {
    auto b = BlockRoutingConfig::from(model_cfg.at("moe").at("block_routing"));
    if (b.policy->restricts()) m->set_block_routing(b.policy, b.block_size);
  }
  return m;
}

void KVCache::truncate(int64_t n) {
  if (n >= length()) return;
  for (auto& l : layers) {
    if (!l.k.defined()) continue;
    l.k = l.k.narrow(2, 0, n);
    l.v = l.v.narrow(2, 0, n);
  }
  if (valid_BK.defined()) valid_BK = valid_BK.narrow(1, 0, n);
}

int64_t ModelBase::num_parameters() const {
  std::unordered_set<const void*> seen;
  int64_t n = 0;
  for (const auto& p : parameters(/*recurse=*/true)) {
    if (seen.insert(p.unsafeGetTensorImpl()).second) n += p.numel();
  }
  // Expert parallelism keeps a slice of each pool on this rank: count the whole model.
  std::unordered_set<const ExpertPool*> pools;
  for (const MoeLayer* l : const_cast<ModelBase*>(this)->moe_layers()) {
    const ExpertPool& pool = l->pool();
    if (!pool.sharded() || !pools.insert(&pool).second) continue;
    const int64_t per_expert =
        (pool.w_gate().numel() + pool.w_up().numel() + pool.w_down().numel()) / pool.n_expert();
    n += (pool.global_n_expert() - pool.n_expert()) * per_expert;
  }
  return n;
}

at::Device module_device(const torch::nn::Module& m, const at::Device& fallback) {
  const auto params = m.parameters(/*recurse=*/true);
  return params.empty() ? fallback : params.front().device();
}

}  // namespace mixdiff
