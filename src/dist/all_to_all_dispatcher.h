// The expert-parallel dispatch stage (moe/dispatcher.h): the routed experts are sharded over the
// ranks of an expert-parallel group (dist/expert_parallel.h: rank j holds experts
// [j E / N, (j + 1) E / N)), and the ExpertPool given to run() holds this rank's E / N experts.
//   1. assignments sorted by expert (stable), so by destination rank; counts exchanged first
//   2. token rows sent all-to-all with those split sizes (variable per step), with the local
//      expert id of each row
//   3. the received rows regrouped by local expert and run through one grouped SwiGLU
//   4. the results sent back by the reverse all-to-all, gated and combined in token order
// Each exchange is a differentiable exchange_rows, so the backward is the mirrored exchange and
// an expert's gradient sums the contributions of every rank's tokens. Every rank of the group
// must call run() for the same layer in the same order, with or without assignments.
//
// Least-loaded mode (dist/least_loaded.h): the per-expert counts of every rank are summed over
// the group first, every rank computes the same plan, and when it moves rows, each row goes to
// the rank its piece names; a rank computing pieces of experts it does not own receives their
// weights (one more exchange_rows, so their gradients flow back to the owner) and runs them after
// its own experts in the same grouped SwiGLU.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "dist/least_loaded.h"
#include "moe/dispatcher.h"

namespace mixdiff {

namespace compat {
class Collectives;
}
struct ExchangeStats;

class AllToAllDispatcher : public Dispatcher {
 public:
  /// `group`: the expert-parallel group (outlives the dispatcher); `n_expert`: the layer's routed
  /// experts E over the whole group (divisible by the group's size); `llep`: least-loaded mode;
  /// `stats` (may be null, outlives the dispatcher): exchange costs are added there.
  AllToAllDispatcher(compat::Collectives& group, int64_t n_expert,
                     std::optional<LlepOptions> llep = std::nullopt,
                     ExchangeStats* stats = nullptr);
  /// expert_A: global expert ids in [0, E); `pool`: this rank's E / N experts.
  at::Tensor run(const ExpertPool& pool, const at::Tensor& x_TD, const at::Tensor& token_A,
                 const at::Tensor& expert_A, const at::Tensor& gate_A) const override;
  std::string name() const override { return llep_ ? "least_loaded" : "all_to_all"; }

 private:
  compat::Collectives& group_;
  int64_t n_expert_;
  std::optional<LlepOptions> llep_;
  ExchangeStats* stats_;
};

}  // namespace mixdiff
