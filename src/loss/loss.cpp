#include "loss/loss.h"

#include "loss/objective.h"

namespace mixdiff {

LossRegistry& losses_registry() {
  static LossRegistry r("losses", "diffusion loss terms (losses[].kind; routing losses: routing_losses)");
  return r;
}

ObjectiveRegistry& objectives_registry() {
  static ObjectiveRegistry r(
      "objectives", "how a training batch is noised and fed to the model (diffusion.objective)");
  return r;
}

}  // namespace mixdiff
