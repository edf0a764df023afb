// The MoE feed-forward layer (algorithms.md sections 0, 6, 11.2 and 12): a router from the
// `routers` registry, an ExpertPool of fine-grained SwiGLU experts, optional always-active shared
// experts (DeepSeekMoE), an optional capacity bound with a drop policy, the routing losses the
// recipe asks for; observers (src/moe/observers.h: telemetry, unique-expert counts) see each
// forward's routing.
//
//   y = sum_a gate_a FFN_{e_a}(x_{t_a})  +  SharedFFN(x)
//
// Routing losses (registry `routing_losses`, moe/routing_loss.h) are computed here, per layer and
// per training forward, from a RoutingRecord, and reach the router through AuxLossScaler: an
// autograd function whose forward returns the layer output unchanged and whose backward hands
// `scale` (the main loss's backward scale, 1 / grad_accum) to the summed, weighted aux loss
// (Megatron's MoEAuxLossAutoScaler, algorithms.md section 0). The trainer therefore never adds
// them to the diffusion loss; it reads their values from the layers for the logs.
//
// Global-batch statistics (algorithms.md 6.2): every training forward adds the layer's
// unbiased top-K counts to a per-step buffer (summed over ranks through the StatReducer), which
// the trainer clears after the optimizer step. Micro-batch m of a step therefore sees the counts
// of micro-batches 1..m (Megatron's running average); the last one sees the whole global batch.
//
// The forward is a pipeline of stages, each behind an interface so that an architecture or a
// parallel layout replaces a stage, not the layer:
//   route     the router (registry `routers`, moe/router.h)
//   restrict  the slot map's visible slots (moe/slot_map.h, built by the model kind) and the
//             block-routing policy's per-block expert sets (moe/block_routing.h)
//   capacity  CapacityLimit (moe/capacity_limit.h; null: dropless)
//   dispatch  Dispatcher (registry `dispatchers`, moe/dispatcher.h) runs the pool's experts on
//   experts   the kept assignments, the slot map naming the pool and each slot's pool expert
//   combine   the gated expert outputs summed per token, plus the shared experts
// then the routing statistics and losses of a training forward, and the observers.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "moe/capacity_limit.h"
#include "moe/context.h"
#include "moe/experts.h"
#include "moe/router.h"
#include "moe/routing_loss.h"
#include "moe/slot_map.h"
#include "nn/layers.h"

namespace mixdiff {

class Dispatcher;

struct MoeOptions {
  int64_t d_model = 0;
  int64_t n_expert = 8;
  int64_t d_expert = 0;         ///< routed expert width F
  int64_t n_shared = 0;         ///< always-active shared experts
  int64_t d_shared = 0;         ///< their total width (default n_shared * d_expert)
  /// The shared experts' output scaled by sigmoid(x . w) with a learned w (`shared_gate` [1, D];
  /// Qwen2-MoE's shared_expert_gate).
  bool shared_gate = false;
  std::shared_ptr<CapacityLimit> capacity;  ///< null: dropless (capacity_factor 0)
  std::shared_ptr<Dispatcher> dispatcher;  ///< registry `dispatchers`; null: sorted
  int64_t stat_buckets = 4;     ///< mask-ratio buckets of the telemetry
  /// Local routing consistency of the telemetry (segment routing best performance and segment
  /// cache best hit rate, observers.h): segment length in tokens and cache size in multiples of
  /// the experts per token.
  int64_t stat_segment = 32;
  double stat_cache = 2.0;
  /// Reads the keys of `model.moe` that belong to one layer (not the router).
  static MoeOptions from(const ConfigNode& moe, int64_t d_model);
};

class BlockRoutingPolicy;
class RoutingObserver;

class MoeLayer : public FeedForward {
 public:
  /// `slots`: what the router's slots stand for (null: SlotMap{}, the layer's own experts).
  MoeLayer(const MoeOptions& o, std::shared_ptr<RouterBase> router,
           std::shared_ptr<SlotMap> slots = nullptr);

  at::Tensor forward(const at::Tensor& x_BLD, const RoutingContext* ctx) override;
  std::vector<MoeLayer*> routed_layers() override { return {this}; }

  /// Routing losses to attach (set by the trainer from the recipe's `losses`).
  void set_aux_losses(std::vector<WeightedRoutingLoss> terms) { aux_ = std::move(terms); }
  /// Backward scale of the attached aux losses (1 / grad_accum).
  void set_aux_scale(double s) { aux_scale_ = s; }
  /// Unweighted per-term values summed over the training forwards since the last call.
  std::vector<double> take_aux_values();
  /// After the optimizer step: balancer update, global buffer reset.
  void step_end(const StatReducer& reduce);
  /// The exact global-batch load-balancing loss of the last optimizer step (GlobalLoad::value()).
  double last_global_lbl() const { return last_global_lbl_; }
  /// Observers see every forward's routing after capacity (src/moe/observers.h): telemetry,
  /// unique-expert counts, parity probes.
  void add_observer(std::shared_ptr<RoutingObserver> o);
  void remove_observer(const RoutingObserver* o);
  void set_reducer(StatReducer r) {
    router_->set_reducer(r);
    reduce_ = std::move(r);
  }
  void set_gatherer(const StatGatherer& g) { router_->set_gatherer(g); }
  /// The ranks of the global batch (data or expert parallelism): a capacity bound of a training
  /// forward counts every rank's tokens (moe/capacity_limit.h).
  void set_rank_scope(RankScope s) { scope_ = std::move(s); }
  /// Index of the transformer block this layer sits in (set by the backbone).
  void set_block_index(int64_t i) { block_ = i; }
  int64_t block_index() const { return block_; }
  /// Chain-of-Experts iteration of this routing step (-1: plain MoE layer; the slot map's).
  int64_t iteration() const { return slots_->iteration; }
  const SlotMap& slots() const { return *slots_; }
  /// Block routing (src/moe/block_routing.h); null: token-level.
  void set_block_routing(std::shared_ptr<BlockRoutingPolicy> p) { block_policy_ = std::move(p); }
  BlockRoutingPolicy* block_routing() const { return block_policy_.get(); }
  /// Replaces the dispatch stage (expert parallelism installs its all-to-all dispatcher).
  void set_dispatcher(std::shared_ptr<Dispatcher> d) { o_.dispatcher = std::move(d); }
  RouterBase& router() { return *router_; }
  const RouterBase& router() const { return *router_; }
  ExpertPool& pool() { return *pool_; }
  const ExpertPool& pool() const { return *pool_; }
  const GlobalLoad& global_load() const { return global_; }
  const MoeOptions& options() const { return o_; }
  std::string describe() const;

 private:
  /// restrict: the slot map's visible slots and the block policy's allowed sets, into ctx.
  void restrict(const at::Tensor& x_TD, RoutingContext& ctx);
  /// Training forwards: adds this forward's counts to the global-batch statistics.
  void count_global(const RoutingDecision& d, const RoutingContext& ctx, int64_t T);
  /// Training forwards that build the graph: the routing losses attached to y_TD.
  at::Tensor attach_losses(const RoutingDecision& d, const RoutingContext& ctx, at::Tensor y_TD);

  MoeOptions o_;
  std::shared_ptr<RouterBase> router_;
  std::shared_ptr<ExpertPool> pool_;
  std::shared_ptr<SwiGLU> shared_;
  at::Tensor shared_gate_;  ///< [1, D] with MoeOptions::shared_gate
  std::shared_ptr<SlotMap> slots_;
  std::vector<WeightedRoutingLoss> aux_;
  std::vector<double> aux_values_;
  double aux_scale_ = 1.0;
  GlobalLoad global_;
  double last_global_lbl_ = 0;
  StatReducer reduce_;
  RankScope scope_;
  int64_t block_ = -1;
  std::shared_ptr<BlockRoutingPolicy> block_policy_;
  std::vector<std::shared_ptr<RoutingObserver>> observers_;
};

/// Returns act unchanged; backward gives `aux` the gradient `scale` (Megatron's
/// MoEAuxLossAutoScaler).
at::Tensor attach_aux_loss(const at::Tensor& act, const at::Tensor& aux, double scale);

}  // namespace mixdiff
