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

#include <array>
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

/// Expert specialisation by domain from assignment counts n[d, e] (tokens of domain d routed to
/// expert e): the mutual information between the chosen expert and the token's domain, over
/// the domain's entropy,
///   S = I(E; D) / H(D),  I = sum_{d,e} p(d,e) log(p(d,e) / (p(d) p(e))),  p(d,e) = n[d,e] / N,
/// in [0, 1]: 0 when the expert distribution is the same for every domain, 1 when each expert
/// serves one domain only (the expert tells the domain). NaN without counts or with one domain.
double specialisation_score(const at::Tensor& counts_DE);

/// Local routing consistency ("Not All Models Suit Expert Offloading", arXiv 2505.21079), over
/// segments of `segment` consecutive positions of a sequence, with k the forward's kept experts
/// per token (rounded, at least 1) and a cache of c = round(cache x k) experts (at most E):
///   segment routing best performance  SRP = sum_s max_{|S|=k} g_s(S) / sum_s g_s(all): the share
///       of the gate mass a segment keeps when all its tokens must use the segment's best k
///       experts (g_s(S): the gates of the segment's assignments to experts in S);
///   segment cache best hit rate  SCH = sum_s max_{|C|=c} n_s(C) / sum_s n_s(all): the hit rate
///       of the best cache of c experts loaded once per segment (n_s(C): assignments to C).
/// Returns the four sums {SRP numerator, SRP denominator, SCH hits, SCH assignments}.
std::array<double, 4> segment_consistency_sums(const at::Tensor& token_A, const at::Tensor& expert_A,
                                               const at::Tensor& gate_A, int64_t n_tokens,
                                               int64_t n_seq, int64_t n_expert, int64_t segment,
                                               double cache);

/// Routing statistics accumulated over a logging interval.
class RoutingStats {
 public:
  /// `n_domains` > 0: also the load of each expert per data domain (forwards whose context
  /// carries domain_T) and the specialisation score, overall and per mask-ratio bucket.
  RoutingStats(int64_t n_expert, int64_t buckets, int64_t n_domains = 0, int64_t segment = 32,
               double cache = 2.0);
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
  /// NormRouter rows with no positive score: the layer adds nothing for them), by_mask_ratio,
  /// segment_routing_best, segment_cache_best_hit (with segment: {length, cache}); with domains
  /// by_domain (tokens_per_expert per domain) and specialisation (also per mask-ratio bucket).
  nlohmann::json to_json() const;
  void reset();

 private:
  int64_t n_expert_, buckets_, n_domains_, segment_;
  double cache_;
  at::Tensor domain_counts_DE_;   ///< fp64 [D, E]
  at::Tensor domain_bucket_NDE_;  ///< fp64 [buckets, D, E]
  double srp_num_ = 0, srp_den_ = 0, sch_hit_ = 0, sch_all_ = 0;
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
  /// `n_domains`: the data's domains (0: none), see RoutingStats.
  explicit RoutingTelemetry(const MoeLayer& layer, int64_t n_domains = 0);
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
