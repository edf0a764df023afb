#include "nn/checkpoint.h"

#include <torch/torch.h>

#include <algorithm>

#include <atomic>

#include "core/compat.h"
#include "core/errors.h"

namespace mixdiff {

namespace {

/// What a region's first forward recorded, read back in order by its recomputation.
struct ReplayLog {
  std::vector<std::vector<at::Tensor>> entries;
  size_t cursor = 0;
};

struct PassState {
  RecomputePass pass = RecomputePass::kNone;
  ReplayLog* log = nullptr;
};

// Per thread: a CUDA backward runs on the device's autograd thread, and the recomputation sets
// its pass there.
thread_local PassState tls_pass;

std::atomic<int64_t> g_recomputed{0};

class PassGuard {
 public:
  PassGuard(RecomputePass p, ReplayLog* log) : saved_(tls_pass) { tls_pass = {p, log}; }
  ~PassGuard() { tls_pass = saved_; }
  PassGuard(const PassGuard&) = delete;
  PassGuard& operator=(const PassGuard&) = delete;

 private:
  PassState saved_;
};

/// The region's function and log, kept by its autograd node until the graph is freed, and the
/// forward's CUDA autocast dtype (kFloat: off), under which it is recomputed.
struct Region : torch::CustomClassHolder {
  RegionFn fn;
  ReplayLog log;
  at::ScalarType autocast = at::kFloat;
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  // Runs under no grad (custom functions' forwards do).
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               c10::intrusive_ptr<Region> region) {
    variable_list in(inputs.begin(), inputs.end());
    ctx->save_for_backward(in);
    region->autocast = compat::cuda_autocast_dtype();
    variable_list out;
    {
      PassGuard g(RecomputePass::kFirst, &region->log);
      out = region->fn(in);
    }
    ctx->saved_data["region"] = c10::IValue::make_capsule(region);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto region =
        c10::static_intrusive_pointer_cast<Region>(ctx->saved_data["region"].toCapsule());
    const variable_list saved = ctx->get_saved_variables();
    variable_list in;
    in.reserve(saved.size());
    for (size_t i = 0; i < saved.size(); ++i) {
      auto t = saved[i].detach();
      if (ctx->needs_input_grad(i)) t.requires_grad_(true);
      in.push_back(std::move(t));
    }
    variable_list out;
    {
      at::AutoGradMode grad_on(true);
      // The first forward's mixed precision (the trainer's autocast guard has ended by now).
      compat::AutocastGuard autocast(region->autocast == at::kFloat ? at::Device(at::kCPU)
                                                                    : at::Device(at::kCUDA),
                                     region->autocast);
      region->log.cursor = 0;
      PassGuard g(RecomputePass::kRecompute, &region->log);
      out = region->fn(in);
      ++g_recomputed;
    }
    TORCH_CHECK(out.size() == grads.size(), "[checkpoint] the recomputation gave ", out.size(),
                " outputs, the first forward ", grads.size());
    variable_list roots, root_grads;
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].requires_grad() && grads[i].defined()) {
        roots.push_back(out[i]);
        root_grads.push_back(grads[i]);
      }
    }
    // Parameters receive their gradients here; the inputs' come back to the outer graph.
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    variable_list result;
    result.reserve(in.size() + 1);
    for (auto& t : in) result.push_back(t.requires_grad() ? t.grad() : at::Tensor());
    result.emplace_back();  // the region
    return result;
  }
};

}  // namespace

RecomputePass recompute_pass() { return tls_pass.pass; }

void replay_record(std::vector<at::Tensor> entry) {
  if (tls_pass.pass == RecomputePass::kFirst && tls_pass.log) {
    tls_pass.log->entries.push_back(std::move(entry));
  }
}

std::vector<at::Tensor> replay_next(const std::string& who) {
  ReplayLog* log = tls_pass.log;
  TORCH_CHECK(tls_pass.pass == RecomputePass::kRecompute && log, "[", who,
              "] replay asked outside a recomputation");
  TORCH_CHECK(log->cursor < log->entries.size(), "[", who, "] the recomputation reads entry ",
              log->cursor + 1, " of a replay log of ", log->entries.size(),
              ": it does not retrace the first forward");
  return log->entries[log->cursor++];
}

int64_t regions_recomputed() { return g_recomputed.load(); }

std::vector<at::Tensor> checkpoint(const RegionFn& fn, const std::vector<at::Tensor>& inputs) {
  // Inside a region: plainly. No input needing a gradient: the node would never be reached by
  // the backward and the region's parameters would get none, so it is a plain forward too.
  const bool any_grad = std::any_of(inputs.begin(), inputs.end(),
                                    [](const at::Tensor& t) { return t.requires_grad(); });
  if (tls_pass.pass != RecomputePass::kNone || !any_grad) return fn(inputs);
  auto region = c10::make_intrusive<Region>();
  region->fn = fn;
  return CheckpointFunction::apply(at::TensorList(inputs), region);
}

std::string ActivationCheckpointing::name() const {
  switch (mode) {
    case Mode::kNone: return "none";
    case Mode::kBlocks: return "blocks";
    case Mode::kMoe: return "moe";
    case Mode::kEveryK: return "every_k";
  }
  return "?";
}

}  // namespace mixdiff
