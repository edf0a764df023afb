// The dispatch stage of an MoE layer (route -> restrict -> capacity -> dispatch -> experts ->
// combine): it moves the routed token rows to their experts, runs the experts of an ExpertPool on
// them and combines the gated outputs back in token order. Registry `dispatchers`
// (model.moe.dispatch), one file each in dispatchers/:
//   sorted  assignments sorted by expert, rows gathered once, one grouped SwiGLU (default)
//   loop    the reference twin: per expert, its rows through a plain SwiGLU under autograd
// An expert-parallel dispatcher (all-to-all over the ranks that hold the experts) is one more
// entry: it receives the same assignments and returns the same combined rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "core/config.h"
#include "core/registry.h"

namespace mixdiff {

class ExpertPool;

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  /// y_TD[t] = sum over assignments a with token_A[a] = t of
  ///           gate_A[a] * FFN_{expert_A[a]}(x_TD[t]),
  /// where expert_A indexes `pool`'s experts. Differentiable in x, the gates and the weights.
  virtual at::Tensor run(const ExpertPool& pool, const at::Tensor& x_TD, const at::Tensor& token_A,
                         const at::Tensor& expert_A, const at::Tensor& gate_A) const = 0;
  /// The registry name (for describe()).
  virtual std::string name() const = 0;
};

/// Factories take the `model.moe` section (a dispatcher's own keys live there).
using DispatcherRegistry = Registry<std::shared_ptr<Dispatcher>, const ConfigNode&>;
DispatcherRegistry& dispatchers_registry();

/// The dispatcher `name` with no options (tests, benchmarks).
std::shared_ptr<Dispatcher> make_dispatcher(const std::string& name);

}  // namespace mixdiff
