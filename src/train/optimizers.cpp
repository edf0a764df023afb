// Built-in optimizers and learning-rate schedules.
//   adamw          torch::optim::AdamW; weight decay on matrices only (norm gains are exempt, as
//                  in nanoGPT / Megatron), decoupled as in Loshchilov & Hutter.
//   warmup_cosine  linear warm-up over warmup_steps, then cosine decay to min_lr_ratio * lr.
//   constant       linear warm-up, then constant.
#include <torch/torch.h>

#include <cmath>

#include "train/optim.h"

namespace mixdiff {

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
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, opts(wd));
  if (!no_decay.empty()) groups.emplace_back(no_decay, opts(0.0));
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
