// The capacity schedules of expert-choice routing (src/moe/capacity.h; EC-DLM's dynamic top-k
// schedulers, algorithms.md 9.2). linear_reverse (more capacity at low mask ratios, late in
// denoising) is the paper's best at matched FLOPs.
#include <cmath>
#include <map>
#include <limits>

#include "core/errors.h"
#include "moe/capacity.h"

namespace mixdiff {

CapacityScheduleRegistry& capacity_schedules_registry() {
  static CapacityScheduleRegistry r("capacity_schedules",
                                    "expert-choice capacity over the mask ratio "
                                    "(model.moe.router.capacity.kind)");
  return r;
}

double CapacitySchedule::k(double r) const {
  const double f = std::clamp(phi(std::clamp(r, 0.0, 1.0)), 0.0, 1.0);
  return std::clamp(std::round(k_min + (k_max - k_min) * f), k_min, k_max);
}

double CapacitySchedule::mean_k() const {
  const int n = 20001;
  double s = 0;
  for (int i = 0; i < n; ++i) s += k(static_cast<double>(i) / (n - 1));
  return s / n;
}

namespace {

class Phi : public CapacitySchedule {
 public:
  enum class Shape { kConstant, kLinear, kLinearReverse, kCosine, kCosineReverse, kBell,
                     kBellGaussian, kBellGaussianReverse };
  Phi(Shape shape, double sigma) : shape_(shape), sigma_(sigma) {}
  double phi(double r) const override {
    switch (shape_) {
      case Shape::kConstant: return 0.0;
      case Shape::kLinear: return r;
      case Shape::kLinearReverse: return 1 - r;
      case Shape::kCosine: return (1 - std::cos(M_PI * r)) / 2;
      case Shape::kCosineReverse: return (1 + std::cos(M_PI * r)) / 2;
      case Shape::kBell: return std::clamp(1 - 4 * (r - 0.5) * (r - 0.5), 0.0, 1.0);
      case Shape::kBellGaussian:
      case Shape::kBellGaussianReverse: break;
    }
    const double e0 = std::exp(-0.25 / (2 * sigma_ * sigma_));
    const double g = std::clamp(
        (std::exp(-(r - 0.5) * (r - 0.5) / (2 * sigma_ * sigma_)) - e0) / (1 - e0), 0.0, 1.0);
    return shape_ == Shape::kBellGaussian ? g : 1 - g;
  }

  /// The shape of a registry name (the names registered below).
  static Shape shape_of(const std::string& kind) {
    static const std::map<std::string, Shape> shapes = {
        {"constant", Shape::kConstant},           {"linear", Shape::kLinear},
        {"linear_reverse", Shape::kLinearReverse}, {"cosine", Shape::kCosine},
        {"cosine_reverse", Shape::kCosineReverse}, {"bell", Shape::kBell},
        {"bell_gaussian", Shape::kBellGaussian},
        {"bell_gaussian_reverse", Shape::kBellGaussianReverse}};
    return shapes.at(kind);
  }

 private:
  Shape shape_;
  double sigma_;
};

std::shared_ptr<CapacitySchedule> make(const std::string& kind, const ConfigNode& c) {
  const double sigma = kind.rfind("bell_gaussian", 0) == 0 ? c.get<double>("sigma", 0.2) : 0.2;
  if (!(sigma > 0)) c.fail("sigma", "expected a positive width");
  auto s = std::make_shared<Phi>(Phi::shape_of(kind), sigma);
  s->name = kind;
  if (kind == "constant") {
    s->k_min = s->k_max = c.get<double>("k");
    if (!(s->k_min > 0)) c.fail("k", "expected a positive number of experts per token");
    return s;
  }
  s->k_min = c.get<double>("k_min");
  s->k_max = c.get<double>("k_max");
  if (!(s->k_min > 0 && s->k_max >= s->k_min)) {
    c.fail("k_max", str("expected 0 < k_min <= k_max, got [", s->k_min, ", ", s->k_max, "]"));
  }
  if (c.has("k_target")) {
    // Shift the window (width kept) until the mean capacity over r ~ U(0, 1) is the target:
    // bisection on the offset (the mean is monotone in it).
    const double target = c.get<double>("k_target"), w = s->k_max - s->k_min;
    double lo = target - w - 1, hi = target + 1;
    for (int it = 0; it < 60; ++it) {
      const double mid = (lo + hi) / 2;
      s->k_min = mid;
      s->k_max = mid + w;
      (s->mean_k() < target ? lo : hi) = mid;
    }
    s->k_min = (lo + hi) / 2;
    s->k_max = s->k_min + w;
    if (!(s->k_min > 0)) c.fail("k_target", "too small for this window");
  }
  return s;
}

#define MIXDIFF_CAPACITY(NAME, HELP)                                                   \
  MIXDIFF_REGISTER(capacity_schedules_registry(), NAME, HELP,                          \
                   [](const ConfigNode& c) -> std::shared_ptr<CapacitySchedule> {      \
                     return make(NAME, c);                                             \
                   })

MIXDIFF_CAPACITY("constant", "k experts per token on average at every mask ratio; key: k");
MIXDIFF_CAPACITY("linear", "phi = r: more capacity at high mask ratios; keys: k_min, k_max, k_target");
MIXDIFF_CAPACITY("linear_reverse", "phi = 1 - r (EC-DLM's best); keys: k_min, k_max, k_target");
MIXDIFF_CAPACITY("cosine", "phi = (1 - cos pi r) / 2; keys: k_min, k_max, k_target");
MIXDIFF_CAPACITY("cosine_reverse", "phi = (1 + cos pi r) / 2; keys: k_min, k_max, k_target");
MIXDIFF_CAPACITY("bell", "phi = 1 - 4 (r - 1/2)^2; keys: k_min, k_max, k_target");
MIXDIFF_CAPACITY("bell_gaussian", "Gaussian bump at r = 1/2; keys: k_min, k_max, k_target, sigma");
MIXDIFF_CAPACITY("bell_gaussian_reverse", "1 - the Gaussian bump; keys: k_min, k_max, k_target, sigma");

}  // namespace

std::shared_ptr<CapacitySchedule> build_capacity_schedule(const ConfigNode& cfg) {
  return capacity_schedules_registry().create(cfg.get<std::string>("kind"), cfg.path() + ".kind",
                                              cfg);
}

}  // namespace mixdiff
