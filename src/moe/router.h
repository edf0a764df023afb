// The router contract of MixDiff's MoE layers (design.md "Main interfaces"; algorithms.md
// sections 0, 8 and 12.1). A router maps the tokens entering a layer to sparse assignments
// (token, expert, gate) that cover token choice (A = T * K) and expert choice (A = E * C), plus
// the full fp32 logits and probabilities for auxiliary losses and statistics. Router math is fp32
// always; top-k ties go to the lower expert index (deterministic on every device).
//
// Routing slots: a router may have more outputs than real experts (AdaMoE's null experts, which
// cost nothing and output zero). S = n_expert + n_null; assignments name real experts only.
//
// Balancers (registry `balancers`) keep a per-slot offset that enters the top-k selection only,
// never the gates (DeepSeek's auxiliary-loss-free bias, BIP's dual prices). Their state is a
// registered buffer, so it is saved in model.safetensors with the weights.
//
// Concrete routers live in routers/, one file each, registered under `routers`.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>

#include "core/config.h"
#include "core/registry.h"
#include "moe/context.h"

namespace mixdiff {

/// Sparse assignments in COO form plus what losses and statistics read.
struct RoutingDecision {
  at::Tensor token_A;    ///< int64 in [0, T), non-decreasing
  at::Tensor expert_A;   ///< int64 in [0, n_expert)
  at::Tensor gate_A;     ///< fp32 combine weight (carries the router's gradient)
  at::Tensor logits_TS;  ///< fp32 router logits [T, S]
  at::Tensor probs_TS;   ///< fp32 [T, S], rows sum to 1: the distribution balancing losses use
                         ///< (softmax; sigmoid scores divided by their sum, as Megatron does)
  at::Tensor lb_map_TS;  ///< fp32 0/1 [T, S], no grad: the unbiased, ungrouped selection that
                         ///< load-balancing losses count (algorithms.md 6.6); padding rows are 0
  at::Tensor weight_SD;  ///< router embeddings (the linear router's rows) for ERC; may be undefined
  at::Tensor scores_TS;  ///< raw gate scores when they are not probs_TS (NormRouter), else undefined
  int64_t n_expert = 0;  ///< real experts E
  int64_t top_k = 0;     ///< K (the largest number of slots a token may take)
  int64_t n_visible = 0; ///< slots the router could choose this forward (0: all S); the
                         ///< load-balancing losses count only these
};

/// Per-slot selection offset that balances expert load without a loss.
class Balancer : public torch::nn::Module {
 public:
  /// Offset [S] added to the selection scores. With `update` (training forwards), the balancer
  /// may first adapt to this batch (BIP's dual sweeps). `scores_TS` is fp32 without grad;
  /// `valid_T` may be undefined (all tokens real).
  virtual at::Tensor offset(const at::Tensor& scores_TS, int64_t top_k, const at::Tensor& valid_T,
                            bool update) = 0;
  /// Slot counts of a training forward's actual selection (real tokens), fp32 [S].
  virtual void observe(const at::Tensor& counts_S) {}
  /// After the optimizer step: update from the step's counts (summed over ranks by `reduce`).
  virtual void step_end(const StatReducer& reduce) {}
  virtual std::string describe() const = 0;
  /// Sums over data-parallel ranks, for balancers whose per-batch state must agree across them.
  void set_reducer(StatReducer r) { reduce_ = std::move(r); }
  /// Gathers the ranks' tensors, for balancers that solve over the global batch.
  void set_gatherer(StatGatherer g) { gather_ = std::move(g); }

 protected:
  StatReducer reduce_;
  StatGatherer gather_;
};

using BalancerRegistry = Registry<std::shared_ptr<Balancer>, const ConfigNode&, int64_t>;
/// Factories take (config, number of routing slots S).
BalancerRegistry& balancers_registry();

/// Builds `cfg`'s balancer by kind; `none` gives nullptr.
std::shared_ptr<Balancer> build_balancer(const ConfigNode& cfg, int64_t n_slots);

/// Sizes a router needs from its layer.
struct RouterDims {
  int64_t d_model = 0;
  int64_t n_expert = 0;
};

class RouterBase : public torch::nn::Module {
 public:
  /// x_TD [T, D] -> assignments; logits in fp32.
  virtual RoutingDecision route(const at::Tensor& x_TD, const RoutingContext& ctx) = 0;
  /// After each optimizer step (training only).
  virtual void step_end(const StatReducer& reduce) {}
  /// Hands the data-parallel sum to the router's balancer (if any).
  virtual void set_reducer(const StatReducer& reduce) {}
  /// Hands the data-parallel gather to the router's balancer (if any).
  virtual void set_gatherer(const StatGatherer& gather) {}
  /// Most experts (routing slots) one token can take: K of top-K.
  virtual int64_t top_k() const = 0;
  /// Real experts per token that accounting can plan with before any routing (FLOP budgets):
  /// K for top-K routers, the capacity schedule's mean k for expert choice; NaN where only a
  /// run can tell (top-p, null experts): a run's measured value is used instead.
  virtual double planned_experts_per_token() const { return static_cast<double>(top_k()); }
  /// Whether the gate scores are ReLU of L2-normalised logits (NormRouter): the logits' scale
  /// is not theirs to shrink, so losses on it (z-loss) only push them below zero.
  virtual bool scores_from_normalised_logits() const { return false; }
  /// One line: kind and options.
  virtual std::string describe() const = 0;
};

using RouterRegistry =
    Registry<std::shared_ptr<RouterBase>, const ConfigNode&, const RouterDims&>;
RouterRegistry& routers_registry();

// ---- helpers shared by routers ----

/// Indices [T, k] of the k largest entries of each row, ties broken towards the lower index
/// (a stable descending sort; torch::topk leaves ties unspecified).
at::Tensor topk_indices(const at::Tensor& scores_TS, int64_t k);

/// Whether routing state may change: a training-mode module under grad mode (not validation, not
/// generation) or in a checkpointed region's first forward, never in its recomputation
/// (nn/checkpoint.h), and not a probe pass of a block routing policy.
bool updates_state(const torch::nn::Module& m, const RoutingContext& ctx);

/// -inf where a block routing policy does not allow a slot (RoutingContext::allowed_TS over the
/// first n_real slots; null slots stay allowed).
at::Tensor restrict_to_allowed(const at::Tensor& sel_TS, const RoutingContext& ctx, int64_t n_real);

/// fp32 [T] on `device`: 1 for real tokens, 0 for padding (`valid_T` undefined: all ones).
at::Tensor valid_weights(const at::Tensor& valid_T, int64_t T, const at::Device& device);

/// The router's logits x W^T in fp32 whatever the activations' dtype: the inputs are cast, and
/// autocast is excluded, since under autocast the linear itself would otherwise run in bf16.
at::Tensor router_logits_fp32(const at::Tensor& x_TD, const at::Tensor& weight_SD);

/// Sets the logits of slots that ctx.visible_S hides (slot_visibility over the first n_real of
/// d.logits_TS's slots) to `fill` (-inf: zero probability, never selected; NormRouter uses 0,
/// before its norm) and counts the visible ones in d.n_visible. Returns the bool [S] visibility
/// on the logits' device, or an undefined tensor (and changes nothing) when all are visible.
at::Tensor hide_invisible_slots(RoutingDecision& d, const RoutingContext& ctx, int64_t n_real,
                                double fill);

/// fp32 [S] count of each slot in `idx_TK` over real tokens.
at::Tensor slot_counts(const at::Tensor& idx_TK, int64_t n_slots, const at::Tensor& valid_T);

/// fp32 0/1 [T, S] map of `idx_TK` with padding rows zeroed, no grad.
at::Tensor selection_map(const at::Tensor& idx_TK, int64_t n_slots, const at::Tensor& valid_T);

/// bool [S] visibility of all S slots from ctx.visible_S over the first n_real slots (null slots
/// are always visible), or undefined when everything is visible.
at::Tensor slot_visibility(const RoutingContext& ctx, int64_t n_real, int64_t n_slots);

/// COO assignments from a [T, K] selection and its gates: drops null slots (>= n_expert) and
/// padding tokens.
void fill_assignments(RoutingDecision& d, const at::Tensor& idx_TK, const at::Tensor& gate_TK,
                      const at::Tensor& valid_T);

}  // namespace mixdiff
