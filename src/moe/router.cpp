#include "moe/router.h"

namespace mixdiff {

RouterRegistry& routers_registry() {
  static RouterRegistry r("routers", "MoE routers (model.moe.router.kind)");
  return r;
}

}  // namespace mixdiff
