// Built-in optimizers and learning-rate schedules.
//   adamw          AdamW; weight decay on matrices only (norm gains are exempt, as in nanoGPT /
//                  Megatron), decoupled as in Loshchilov & Hutter. `fused: true` (default) updates
//                  each parameter in one pass (FusedAdamW below); false uses torch::optim::AdamW.
//   warmup_cosine  linear warm-up over warmup_steps, then cosine decay to min_lr_ratio * lr.
//   constant       linear warm-up, then constant.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/compat.h"
#include "core/profile.h"
#include "train/adamw_kernel.h"
#include "train/optim.h"

namespace mixdiff {

namespace {

/// AdamW whose update is one pass over each parameter, its gradient and its two moments (the
/// LibTorch implementation makes about nine passes and two temporaries per parameter). Same
/// formula, operation for operation (decoupled decay, bias corrections, eps outside the square
/// root), the same state and serialisation as torch::optim::AdamW; falls back to it for tensors
/// that are not contiguous fp32 on the CPU and for amsgrad.
class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;

  at::Tensor step(LossClosure closure = nullptr) override {
    torch::NoGradGuard ng;
    at::Tensor loss;
    if (closure) loss = closure();
    for (auto& group : param_groups()) {
      auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
      const double lr = o.lr(), wd = o.weight_decay(), eps = o.eps();
      const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        const auto& g = p.grad();
        const bool fast = !o.amsgrad() && p.device().is_cpu() && p.scalar_type() == at::kFloat &&
                          p.is_contiguous() && g.is_contiguous() && g.scalar_type() == at::kFloat;
        compat::AdamMoments m = compat::adamw_moments(*this, p);
        if (!m.exp_avg.defined()) {
          m.exp_avg = torch::zeros_like(p, at::MemoryFormat::Preserve);
          m.exp_avg_sq = torch::zeros_like(p, at::MemoryFormat::Preserve);
          m.step = 0;
        }
        m.step += 1;
        const double bc1 = 1 - std::pow(b1, static_cast<double>(m.step));
        const double bc2 = 1 - std::pow(b2, static_cast<double>(m.step));
        const double step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
        if (fast && m.exp_avg.is_contiguous() && m.exp_avg_sq.is_contiguous()) {
          const AdamWScalars k =
              adamw_scalars(lr, wd, b1, b2, eps, bc2_sqrt, step_size, grad_scale_);
          adamw_update(p.data_ptr<float>(), g.data_ptr<float>(), m.exp_avg.data_ptr<float>(),
                       m.exp_avg_sq.data_ptr<float>(), p.numel(), k);
        } else {  // LibTorch's sequence of operations
          if (grad_scale_ != 1.0) g.mul_(grad_scale_);
          p.mul_(1 - lr * wd);
          m.exp_avg.mul_(b1).add_(g, 1 - b1);
          m.exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2);
          p.addcdiv_(m.exp_avg, (m.exp_avg_sq.sqrt() / bc2_sqrt).add_(eps), -step_size);
        }
        compat::set_adamw_moments(*this, p, m);
      }
    }
    grad_scale_ = 1.0;
    return loss;
  }

  /// Multiplies the gradients by `s` inside the next step (gradient clipping without a pass over
  /// the gradients).
  void scale_next_gradients(double s) { grad_scale_ = s; }

 private:
  double grad_scale_ = 1.0;
};

}  // namespace

double global_grad_norm(const std::vector<at::Tensor>& params) {
  profile::Scope sc("optimizer.clip");
  double sq = 0;
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    const double n = p.grad().norm().item<double>();
    sq += n * n;
  }
  return std::sqrt(sq);
}

double clip_coefficient(double max_norm, double norm) {
  return max_norm > 0 ? std::min(1.0, max_norm / (norm + 1e-6)) : 1.0;
}

void clip_step_zero(torch::optim::Optimizer& opt, const std::vector<at::Tensor>& params,
                    double max_norm, double norm) {
  // The fused AdamW applies the factor inside its update.
  const double coef = clip_coefficient(max_norm, norm);
  if (coef < 1) {
    if (auto* fused = dynamic_cast<FusedAdamW*>(&opt)) {
      fused->scale_next_gradients(coef);
    } else {
      torch::NoGradGuard ng;
      for (const auto& p : params) {
        if (p.grad().defined()) p.grad().mul_(coef);
      }
    }
  }
  {
    profile::Scope sc("optimizer.step");
    opt.step();
  }
  // Gradients set to none (PyTorch 2's default): the next backward then stores its gradients
  // instead of adding them to zeros, one pass over every gradient less.
  profile::Scope sc("optimizer.zero_grad");
  for (auto& g : opt.param_groups()) {
    for (auto& p : g.params()) {
      if (p.grad().defined()) p.mutable_grad() = at::Tensor();
    }
  }
}

namespace {

std::unique_ptr<torch::optim::Optimizer> make_adamw(const ConfigNode& c, torch::nn::Module& m) {
  const double lr = c.get<double>("lr");
  const auto betas = c.get<std::vector<double>>("betas", {0.9, 0.95});
  const double eps = c.get<double>("eps", 1e-8);
  const double wd = c.get<double>("weight_decay", 0.1);
  if (!(lr > 0)) c.fail("lr", str("expected a positive learning rate, got ", lr));
  if (betas.size() != 2 || !(betas[0] >= 0 && betas[0] < 1 && betas[1] >= 0 && betas[1] < 1)) {
    c.fail("betas", "expected two numbers in [0, 1), e.g. [0.9, 0.95]");
  }
  if (!(wd >= 0)) c.fail("weight_decay", "expected a non-negative number");
  std::vector<at::Tensor> decay, no_decay;
  for (auto& p : m.parameters(/*recurse=*/true)) {
    if (!p.requires_grad()) continue;
    (p.dim() >= 2 ? decay : no_decay).push_back(p);
  }
  auto opts = [&](double w) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(lr).betas({betas[0], betas[1]}).eps(eps).weight_decay(w));
  };
  const bool fused = c.get<bool>("fused", true);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, opts(wd));
  if (!no_decay.empty()) groups.emplace_back(no_decay, opts(0.0));
  if (fused) return std::make_unique<FusedAdamW>(groups, torch::optim::AdamWOptions(lr));
  return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(lr));
}

class WarmupCosine : public LrSchedule {
 public:
  WarmupCosine(const ConfigNode& c, int64_t total)
      : total_(total),
        warmup_(c.get<int64_t>("warmup_steps", 0)),
        min_ratio_(c.get<double>("min_lr_ratio", 0.1)) {
    if (warmup_ < 0) c.fail("warmup_steps", "expected a non-negative integer");
    if (!(min_ratio_ >= 0 && min_ratio_ <= 1)) c.fail("min_lr_ratio", "expected a number in [0, 1]");
  }
  double factor(int64_t s) const override {
    if (s < warmup_) return static_cast<double>(s + 1) / static_cast<double>(warmup_);
    const double span = std::max<int64_t>(1, total_ - warmup_);
    const double progress = std::min(1.0, static_cast<double>(s - warmup_) / span);
    return min_ratio_ + (1.0 - min_ratio_) * 0.5 * (1.0 + std::cos(M_PI * progress));
  }

 private:
  int64_t total_, warmup_;
  double min_ratio_;
};

class WarmupConstant : public LrSchedule {
 public:
  WarmupConstant(const ConfigNode& c, int64_t) : warmup_(c.get<int64_t>("warmup_steps", 0)) {
    if (warmup_ < 0) c.fail("warmup_steps", "expected a non-negative integer");
  }
  double factor(int64_t s) const override {
    return s < warmup_ ? static_cast<double>(s + 1) / static_cast<double>(warmup_) : 1.0;
  }

 private:
  int64_t warmup_;
};

MIXDIFF_REGISTER(optimizers_registry(), "adamw",
                 "AdamW, decay on matrices only; keys: lr, betas, eps, weight_decay", make_adamw);
MIXDIFF_REGISTER(lr_schedules_registry(), "warmup_cosine",
                 "linear warm-up then cosine decay; keys: warmup_steps, min_lr_ratio",
                 [](const ConfigNode& c, int64_t total) -> std::shared_ptr<LrSchedule> {
                   return std::make_shared<WarmupCosine>(c, total);
                 });
MIXDIFF_REGISTER(lr_schedules_registry(), "constant", "linear warm-up then constant; keys: warmup_steps",
                 [](const ConfigNode& c, int64_t total) -> std::shared_ptr<LrSchedule> {
                   return std::make_shared<WarmupConstant>(c, total);
                 });

}  // namespace
}  // namespace mixdiff
