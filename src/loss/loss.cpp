#include "loss/loss.h"

namespace mixdiff {

LossRegistry& losses_registry() {
  static LossRegistry r("losses", "diffusion loss terms (losses[].kind; routing losses: routing_losses)");
  return r;
}

}  // namespace mixdiff
