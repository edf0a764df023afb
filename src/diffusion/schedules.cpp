// Noise schedules of masked diffusion (registry `schedules`; algorithms.md 1.2 and 1.6).
//   linear  p(t) = (1 - eps) t + eps, weight 1/p(t): LLaDA's pre-training process, whose weight
//           is the 1/t of the ELBO with the eps floor folded in (LLaDA uses 1/p, not p'/p).
//   cosine  p(t) = eps + (1 - eps)(1 - cos(pi t / 2)), weight p'(t)/p(t) (the general
//           -alpha'_t / (1 - alpha_t) of MDLM for alpha_t = 1 - p(t)).
// Both take t_min/t_max: t ~ U[t_min, t_max] gives BD3-LM's clipped schedules (e.g. [0.3, 0.8]),
// and t_sampling: uniform (LLaDA: independent t per sequence) or stratified (MDLM's
// low-discrepancy draws, one t per stratum of the batch).
#include <torch/torch.h>

#include <cmath>

#include "diffusion/diffusion.h"

namespace mixdiff {
namespace {

void read_range(const ConfigNode& c, NoiseSchedule& s) {
  s.t_min = c.get<double>("t_min", 0.0);
  s.t_max = c.get<double>("t_max", 1.0);
  const std::string sampling = c.get<std::string>("t_sampling", "uniform");
  if (sampling != "uniform" && sampling != "stratified") {
    c.fail("t_sampling", "expected uniform or stratified, got '" + sampling + "'");
  }
  s.stratified = sampling == "stratified";
  if (!(s.t_min >= 0.0 && s.t_min < s.t_max && s.t_max <= 1.0)) {
    c.fail("t_min", str("expected 0 <= t_min < t_max <= 1, got [", s.t_min, ", ", s.t_max, "]"));
  }
}

double read_eps(const ConfigNode& c) {
  const double eps = c.get<double>("eps", 1e-3);
  if (!(eps >= 0.0 && eps < 1.0)) c.fail("eps", str("expected 0 <= eps < 1, got ", eps));
  return eps;
}

class LinearSchedule : public NoiseSchedule {
 public:
  explicit LinearSchedule(const ConfigNode& c) : eps_(read_eps(c)) { read_range(c, *this); }
  at::Tensor mask_prob(const at::Tensor& t) const override { return t * (1.0 - eps_) + eps_; }
  at::Tensor elbo_weight(const at::Tensor& t) const override { return 1.0 / mask_prob(t); }

 private:
  double eps_;
};

class CosineSchedule : public NoiseSchedule {
 public:
  explicit CosineSchedule(const ConfigNode& c) : eps_(read_eps(c)) { read_range(c, *this); }
  at::Tensor mask_prob(const at::Tensor& t) const override {
    return (1.0 - torch::cos(t * (M_PI / 2))) * (1.0 - eps_) + eps_;
  }
  at::Tensor elbo_weight(const at::Tensor& t) const override {
    return torch::sin(t * (M_PI / 2)) * ((1.0 - eps_) * M_PI / 2) / mask_prob(t);
  }

 private:
  double eps_;
};

MIXDIFF_REGISTER(schedules_registry(), "linear",
                 "LLaDA: p = (1-eps) t + eps, weight 1/p; keys: eps, t_min, t_max, t_sampling",
                 [](const ConfigNode& c) -> std::shared_ptr<NoiseSchedule> {
                   return std::make_shared<LinearSchedule>(c);
                 });
MIXDIFF_REGISTER(schedules_registry(), "cosine",
                 "p = eps + (1-eps)(1 - cos(pi t/2)), weight p'/p; keys: eps, t_min, t_max, t_sampling",
                 [](const ConfigNode& c) -> std::shared_ptr<NoiseSchedule> {
                   return std::make_shared<CosineSchedule>(c);
                 });

}  // namespace
}  // namespace mixdiff
