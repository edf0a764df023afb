// Observers of an MoE layer's routing (the layer's last stage): what one forward routed, seen by
// whoever attached an observer, so that telemetry, unique-expert counts and parity probes are not
// fields of the layer. The trainer attaches RoutingTelemetry (and `bench` with it, to time the
// same work), `eval`'s block routing a UniqueExpertCounter, parity tests LastRouting.
//
//   auto tel = observe_layers<RoutingTelemetry>(model.moe_layers());   // one per layer
//   ... forwards ...
//   nlohmann::json j = tel[0]->take(reduce);
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/context.h"
#include "moe/router.h"

namespace mixdiff {

class MoeLayer;

/// What one forward of a layer routed. The assignments are those kept after capacity, in router
/// slots; `routed` counts them before it.
struct RoutedForward {
  const MoeLayer& layer;
  const RoutingDecision& decision;  ///< the router's decision (before capacity)
  const RoutingContext& ctx;
  const at::Tensor& token_A;
  const at::Tensor& expert_A;
  const at::Tensor& gate_A;
  int64_t routed = 0;
  bool updates_state = false;  ///< a training forward that updates routing state (not a probe)
};

class RoutingObserver {
 public:
  virtual ~RoutingObserver() = default;
  virtual void on_forward(const RoutedForward& f) = 0;
};

/// Routing statistics accumulated over a logging interval.
class RoutingStats {
 public:
  RoutingStats(int64_t n_expert, int64_t buckets);
  /// `kept_expert_A`/`kept_token_A`/`kept_gate_A`: assignments after capacity; `routed` before
  /// it.
  void add(const RoutingDecision& d, const at::Tensor& kept_token_A,
           const at::Tensor& kept_expert_A, const at::Tensor& kept_gate_A, int64_t routed,
           const RoutingContext& ctx);
  bool empty() const { return tokens_ == 0; }
  /// Sums the accumulated statistics over data-parallel ranks (before to_json).
  void reduce(const StatReducer& r);
  /// tokens_per_expert, max_mean, cv, dead, entropy, dropped, experts_per_token,
  /// experts_per_token_hist, unrouted, zero_gate (tokens whose experts all got gate 0, e.g.
  /// NormRouter rows with no positive score: the layer adds nothing for them), by_mask_ratio.
  nlohmann::json to_json() const;
  void reset();

 private:
  int64_t n_expert_, buckets_;
  at::Tensor counts_E_;         ///< fp64
  at::Tensor bucket_counts_NE_; ///< fp64 [buckets, E]
  at::Tensor bucket_tokens_N_;  ///< fp64 [buckets]
  at::Tensor per_token_hist_;   ///< fp64 [9]: real tokens with 0, 1, ..., 7, >= 8 experts
  double tokens_ = 0, entropy_sum_ = 0, routed_ = 0, kept_ = 0;
  double zero_gate_ = 0;  ///< real tokens with experts whose gates are all 0
};

/// The layer's routing telemetry over a logging interval (training forwards only).
class RoutingTelemetry : public RoutingObserver {
 public:
  explicit RoutingTelemetry(const MoeLayer& layer);
  void on_forward(const RoutedForward& f) override;
  /// Telemetry since the last call, summed over ranks by `reduce` when given (null when nothing
  /// was routed), then reset. Adds `global_lbl`, the exact global-batch load-balancing loss of
  /// the last optimizer step, and `iteration` for a Chain-of-Experts step.
  nlohmann::json take(const StatReducer& reduce = {});

 private:
  const MoeLayer& layer_;
  RoutingStats stats_;
};

/// Distinct experts used by each routing block of each forward (algorithms.md 10.0), for
/// forwards that carry routing blocks.
class UniqueExpertCounter : public RoutingObserver {
 public:
  struct Total {
    double sum = 0;      ///< sum over (forward, block) of the block's distinct experts
    int64_t blocks = 0;  ///< (forward, block) pairs
  };
  void on_forward(const RoutedForward& f) override;
  Total take() { return std::exchange(total_, Total{}); }

 private:
  Total total_;
};

/// A copy of the latest forward's routing decision (parity checks).
class LastRouting : public RoutingObserver {
 public:
  void on_forward(const RoutedForward& f) override { last_ = f.decision; }
  const RoutingDecision& get() const { return last_; }

 private:
  RoutingDecision last_;
};

/// Distinct experts of every routing block: the sum over blocks of |experts used by the block's
/// assignments| and the number of blocks (real tokens only).
std::pair<double, int64_t> unique_experts_per_block(const at::Tensor& block_T,
                                                    const at::Tensor& token_A,
                                                    const at::Tensor& expert_A, int64_t n_expert,
                                                    const at::Tensor& valid_T);

/// Attaches a new Obs(layer, args...) (or Obs(args...)) to each layer, in order; returns them.
template <class Obs, class Layer, class... Args>
std::vector<std::shared_ptr<Obs>> observe_layers(const std::vector<Layer*>& layers,
                                                 Args&&... args) {
  std::vector<std::shared_ptr<Obs>> out;
  for (Layer* l : layers) {
    std::shared_ptr<Obs> o;
    if constexpr (std::is_constructible_v<Obs, const Layer&, Args...>) {
      o = std::make_shared<Obs>(*l, args...);
    } else {
      o = std::make_shared<Obs>(args...);
    }
    l->add_observer(o);
    out.push_back(std::move(o));
  }
  return out;
}

/// Detaches observers attached by observe_layers.
template <class Obs, class Layer>
void unobserve_layers(const std::vector<Layer*>& layers,
                      const std::vector<std::shared_ptr<Obs>>& observers) {
  for (size_t i = 0; i < layers.size() && i < observers.size(); ++i) {
    layers[i]->remove_observer(observers[i].get());
  }
}

}  // namespace mixdiff
