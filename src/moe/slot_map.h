// The slot map of an MoE layer: what the router's S slots stand for, where the experts' weights
// live, and which slots a forward may choose (the "restrict" stage of route -> restrict ->
// capacity -> dispatch -> experts -> combine, with the block-routing policy). The model kind in
// models/ builds one per layer, so an architecture that shares or re-maps experts is a subclass
// in its own file and the MoE layer does not change:
//   vanilla MoE        SlotMap{}: the layer owns n_expert experts, slot e is expert e
//   UniPool            one pool for every layer, a fixed visible slice per layer (unipool_dlm)
//   ReXMoE             slots over the experts of neighbouring blocks, progressively visible
//                      (rexmoe_dlm)
//   Chain-of-Experts   every iteration's layer maps onto the block's one pool and shared expert,
//                      `iteration` names the routing step (coe_dlm)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>

namespace mixdiff {

class ExpertPool;
class SwiGLU;

class SlotMap {
 public:
  /// Own experts: the layer makes and registers a pool of n_expert experts; slot e is expert e.
  SlotMap() = default;
  /// Slots into `pool`, which the model owns and registers (it may serve several layers): slot s
  /// is pool expert candidates_S[s] (int64 [S]; undefined: slot s is expert s, and the pool has
  /// exactly S experts); `pool_users` routed layers draw on the pool (pool-level losses divide by
  /// it).
  explicit SlotMap(std::shared_ptr<ExpertPool> pool, at::Tensor candidates_S = {},
                   int64_t pool_users = 1);
  virtual ~SlotMap() = default;

  /// bool [S]: the slots a forward may choose at training step `step`, on `device`; undefined
  /// when every slot may be chosen (the default). Outside training a map should open every slot
  /// it only hides for a schedule.
  virtual at::Tensor visible(int64_t step, bool training, const c10::Device& device);
  /// What describe() of the layer adds (empty: nothing).
  virtual std::string describe() const { return ""; }

  /// int64 [A]: the pool expert of each router slot in slot_A (on slot_A's device).
  at::Tensor pool_experts(const at::Tensor& slot_A);

  /// The model-owned pool; null: the layer owns its experts.
  const std::shared_ptr<ExpertPool>& pool() const { return pool_; }
  /// int64 [S] pool expert of each slot (undefined: identity), on the device last used.
  const at::Tensor& candidates() const { return candidates_S_; }
  int64_t pool_users() const { return pool_users_; }

  /// Shared (always-active) experts owned by the model (Chain-of-Experts' iterations share the
  /// block's one); null: the layer makes its own when the options ask for them.
  std::shared_ptr<SwiGLU> shared_experts;
  /// The Chain-of-Experts iteration this layer routes (-1: a plain MoE layer). Telemetry reports
  /// it; block-routing memory is keyed by it.
  int64_t iteration = -1;

 protected:
  /// `t` moved to `device` in place (at most once per device change) and returned: host-built
  /// maps follow the activations (they are not buffers, so not in model.safetensors).
  static const at::Tensor& on(at::Tensor& t, const c10::Device& device);

 private:
  std::shared_ptr<ExpertPool> pool_;
  at::Tensor candidates_S_;
  int64_t pool_users_ = 1;
};

}  // namespace mixdiff
