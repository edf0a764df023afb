// aux_free: DeepSeek's auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664;
// DeepSeek-V3; algorithms.md 8.4 and 8.5). A per-slot bias b (fp32 buffer `bias`, never a
// parameter, never in the gates) is added to the selection scores. After each optimizer step,
// with c the slot counts of the step's routing (all micro-batches, summed over data-parallel
// ranks) and e = mean(c) - c:
//   update: sign          b += u_t * sign(e)            (the paper; Megatron's default)
//   update: proportional  b += u_t * e / mean(c)        (ablation proposed by the theory of
//                                                        Han & Zhong, arXiv 2512.03915)
// with u_t = rate for decay_steps = 0, else rate * decay_steps / (decay_steps + t) (a diminishing
// step, t = updates done; the step-size forms are a proposal, algorithms.md 8.5 NOT FOUND).
#include <torch/torch.h>

#include "core/errors.h"
#include "moe/router.h"

namespace mixdiff {
namespace {

class AuxFreeBias : public Balancer {
 public:
  AuxFreeBias(const ConfigNode& c, int64_t n_slots) {
    rate_ = c.get<double>("rate", 1e-3);
    if (!(rate_ > 0)) c.fail("rate", "expected a positive step size");
    const std::string u = c.get<std::string>("update", "sign");
    if (u != "sign" && u != "proportional") {
      c.fail("update", "expected sign or proportional, got '" + u + "'");
    }
    proportional_ = u == "proportional";
    decay_steps_ = c.get<double>("decay_steps", 0.0);
    if (decay_steps_ < 0) c.fail("decay_steps", "expected >= 0 (0: constant rate)");
    bias_ = register_buffer("bias", torch::zeros({n_slots}, torch::kFloat32));
    updates_ = register_buffer("updates", torch::zeros({1}, torch::kFloat64));
  }

  at::Tensor offset(const at::Tensor&, int64_t, const at::Tensor&, bool) override { return bias_; }

  void observe(const at::Tensor& counts_S) override {
    counts_ = counts_.defined() ? counts_ + counts_S : counts_S.clone();
  }

  void step_end(const StatReducer& reduce) override {
    if (!counts_.defined()) return;
    torch::NoGradGuard ng;
    at::Tensor c_S = counts_;
    counts_ = at::Tensor();
    if (reduce) reduce(c_S);
    const double t = updates_.item<double>();
    const double u = decay_steps_ > 0 ? rate_ * decay_steps_ / (decay_steps_ + t) : rate_;
    auto mean = c_S.mean();
    auto e_S = mean - c_S;
    if (proportional_) {
      bias_.add_(e_S / mean.clamp_min(1e-12) * u);
    } else {
      bias_.add_(e_S.sign() * u);
    }
    updates_.add_(1.0);
  }

  std::string describe() const override {
    return str("aux-free bias (", proportional_ ? "proportional" : "sign", ", rate ",
               format_double(rate_), decay_steps_ > 0 ? str(", decay ", format_double(decay_steps_)) : "",
               ")");
  }

 private:
  double rate_ = 1e-3, decay_steps_ = 0;
  bool proportional_ = false;
  at::Tensor bias_, updates_, counts_;
};

MIXDIFF_REGISTER(balancers_registry(), "aux_free",
                 "DeepSeek auxiliary-loss-free bias: b += rate * sign(mean(c) - c) after each "
                 "step; keys: rate (1e-3), update (sign|proportional), decay_steps (0)",
                 [](const ConfigNode& c, int64_t s) -> std::shared_ptr<Balancer> {
                   return std::make_shared<AuxFreeBias>(c, s);
                 });

}  // namespace
}  // namespace mixdiff
