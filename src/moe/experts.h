// The routed experts of an MoE layer: E SwiGLU experts stored as stacked weights
// (w_gate [E, F, D], w_up [E, F, D], w_down [E, D, F]; algorithms.md section 0), never as E
// separate modules, so that one pool can serve several layers (UniPool) and the weights are one
// tensor each in model.safetensors.
//
// How assignments reach the experts is the dispatch stage (src/moe/dispatcher.h, registry
// `dispatchers`); the pool holds the weights and the grouped SwiGLU that dispatchers call.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <optional>
#include <string>
#include <vector>

namespace mixdiff {

class Dispatcher;

/// Pool-level usage of a pool shared by several layers (UniPool's one-step-behind statistics):
/// the layer-averaged expert counts of the previous micro-batch (buffers, so a resumed run has
/// them) and the running sum of the current one.
struct PoolUsage {
  at::Tensor prev_M;   ///< buffer: layer-averaged usage (top-K counts per routed token, over
                       ///< every data-parallel rank) of the previous micro-batch
  at::Tensor ready;    ///< buffer [1]: 1 once prev_M holds a micro-batch
  at::Tensor sum_M;    ///< this micro-batch so far
  int64_t seen = 0;    ///< layers added this micro-batch
};

class ExpertPool : public torch::nn::Module {
 public:
  /// `track_usage`: keep PoolUsage (pools shared by several layers).
  ExpertPool(int64_t n_expert, int64_t d_model, int64_t d_expert, bool track_usage = false);
  /// Null unless the pool tracks usage.
  PoolUsage* usage() { return usage_ ? &*usage_ : nullptr; }

  /// y_TD[t] = sum over assignments a with token_A[a] = t of gate_A[a] * FFN_{expert_A[a]}(x_t),
  /// computed by `dispatcher`.
  at::Tensor forward(const at::Tensor& x_TD, const at::Tensor& token_A, const at::Tensor& expert_A,
                     const at::Tensor& gate_A, const Dispatcher& dispatcher) const;

  /// Expert parallelism: keep only experts [first, first + count) of this pool (the parameters
  /// keep their identity and names, their data becomes the slice). n_expert() is then `count`,
  /// first_expert() `first`, global_n_expert() the count before.
  void shard(int64_t first, int64_t count);
  int64_t first_expert() const { return first_expert_; }
  int64_t global_n_expert() const { return global_n_expert_; }
  bool sharded() const { return global_n_expert_ != n_expert_; }

  int64_t n_expert() const { return n_expert_; }
  int64_t d_expert() const { return d_expert_; }
  const at::Tensor& w_gate() const { return w_gate_; }
  const at::Tensor& w_up() const { return w_up_; }
  const at::Tensor& w_down() const { return w_down_; }

 private:
  int64_t n_expert_, d_model_, d_expert_;
  int64_t first_expert_ = 0, global_n_expert_ = 0;
  at::Tensor w_gate_, w_up_, w_down_;
  std::optional<PoolUsage> usage_;
};

/// Host copy of bincount(ids, n): the rows per expert that drive grouped_swiglu's loop (one
/// device-to-host copy on a GPU).
std::vector<int64_t> host_counts(const at::Tensor& ids, int64_t n);

/// SwiGLU of rows grouped by expert: rows [off_e, off_e + counts[e]) of xs_AD go through expert e.
/// Differentiable in xs and the three weights (custom backward, one autograd node).
at::Tensor grouped_swiglu(const at::Tensor& xs_AD, const std::vector<int64_t>& counts,
                          const at::Tensor& w_gate_EFD, const at::Tensor& w_up_EFD,
                          const at::Tensor& w_down_EDF);

}  // namespace mixdiff
