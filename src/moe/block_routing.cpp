#include "moe/block_routing.h"

#include <torch/torch.h>

#include "core/errors.h"

namespace mixdiff {

BlockRoutingRegistry& block_routing_registry() {
  static BlockRoutingRegistry r("block_routing",
                                "expert sets shared by the tokens of a block "
                                "(infer.block_routing.kind, model.moe.block_routing.kind)");
  return r;
}

BlockRoutingConfig BlockRoutingConfig::from(const ConfigNode& c) {
  BlockRoutingConfig b;
  b.kind = c.get<std::string>("kind", "token");
  b.block_size = c.get<int64_t>("block_size", 32);
  if (b.block_size <= 0) c.fail("block_size", "expected a positive number of positions");
  b.policy = block_routing_registry().create(b.kind, c.path() + ".kind", c);
  return b;
}

std::pair<at::Tensor, at::Tensor> block_index(const at::Tensor& block_T) {
  auto u = at::_unique(block_T, /*sorted=*/true, /*return_inverse=*/true);
  return {std::get<0>(u), std::get<1>(u)};
}

}  // namespace mixdiff
