// The capacity stage of an MoE layer (route -> restrict -> capacity -> dispatch -> experts ->
// combine): which of the router's assignments the experts process. Null in MoeOptions is
// dropless. ExpertCapacity is today's bound (algorithms.md section 0): each expert keeps at most
//   C = ceil(capacity_factor * T_real * K / E)
// assignments of the forward's T_real real (non-padding) tokens, by gate (drop_policy:
// probability, the lowest gates go first) or by token position (drop_policy: position, the latest
// positions go first); a dropped assignment contributes nothing (the token keeps its residual path
// and its other experts). Under data or expert parallelism (a RankScope of several ranks) the
// bound is the global batch's: T_real summed over the ranks and each expert's assignments ranked
// over every rank's tokens (position: the global token index, rank-major as the ranks' rows sit
// in the global batch), so W ranks drop exactly what one process with the global batch drops.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "moe/context.h"

namespace mixdiff {

/// One forward's routed assignments in router slots: assignment a sends token token_A[a] to slot
/// slot_A[a] with weight gate_A[a].
struct Assignments {
  at::Tensor token_A;  ///< int64 [A]
  at::Tensor slot_A;   ///< int64 [A]
  at::Tensor gate_A;   ///< float [A]
  /// What CapacityLimit::apply kept: int64 positions in its input, ascending (undefined: all of
  /// them). A recomputation replays the drops through it (nn/checkpoint.h).
  at::Tensor index_A;
  int64_t size() const { return token_A.numel(); }
};

class CapacityLimit {
 public:
  virtual ~CapacityLimit() = default;
  /// The assignments the experts process, in their original order (a subset of `a`).
  /// `n_slots`: S; `top_k`: the router's nominal K; `real_tokens`: T_real of this rank's
  /// `n_tokens` tokens; `scope`: the ranks whose forwards share the bound (collective when it
  /// holds several: every rank calls it).
  virtual Assignments apply(const Assignments& a, int64_t n_slots, int64_t top_k,
                            double real_tokens, int64_t n_tokens,
                            const RankScope& scope = {}) const = 0;
  virtual std::string describe() const = 0;
};

/// Which assignments over an expert's capacity are dropped first.
enum class DropPolicy {
  kProbability,  ///< the lowest gates
  kPosition,     ///< the latest token positions
};

class ExpertCapacity : public CapacityLimit {
 public:
  ExpertCapacity(double capacity_factor, DropPolicy drop);
  Assignments apply(const Assignments& a, int64_t n_slots, int64_t top_k, double real_tokens,
                    int64_t n_tokens, const RankScope& scope = {}) const override;
  std::string describe() const override;
  /// ceil(capacity_factor * real_tokens * top_k / n_slots).
  int64_t capacity(int64_t n_slots, int64_t top_k, double real_tokens) const;
  /// Indices into the assignments that survive (sorted), or undefined when nothing is dropped:
  /// per expert, the `capacity` assignments of lowest priority_A (ties: earlier assignment).
  static at::Tensor keep(const at::Tensor& expert_A, const at::Tensor& priority_A,
                         int64_t n_expert, int64_t capacity);

 private:
  double factor_;
  DropPolicy drop_;
};

}  // namespace mixdiff
