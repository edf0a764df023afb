#include "report/stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>

namespace mixdiff {

namespace {

/// Continued fraction of the regularized incomplete beta function (modified Lentz), valid for
/// x < (a + 1) / (a + b + 2).
double beta_fraction(double a, double b, double x) {
  const double tiny = 1e-300;
  double c = 1, d = 1 - (a + b) * x / (a + 1);
  if (std::fabs(d) < tiny) d = tiny;
  d = 1 / d;
  double h = d;
  for (int m = 1; m <= 500; ++m) {
    const double m2 = 2.0 * m;
    // even step
    double num = m * (b - m) * x / ((a + m2 - 1) * (a + m2));
    d = 1 + num * d;
    if (std::fabs(d) < tiny) d = tiny;
    c = 1 + num / c;
    if (std::fabs(c) < tiny) c = tiny;
    d = 1 / d;
    h *= d * c;
    // odd step
    num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1));
    d = 1 + num * d;
    if (std::fabs(d) < tiny) d = tiny;
    c = 1 + num / c;
    if (std::fabs(c) < tiny) c = tiny;
    d = 1 / d;
    const double del = d * c;
    h *= del;
    if (std::fabs(del - 1) < 1e-15) break;
  }
  return h;
}

/// Regularized incomplete beta I_x(a, b).
double incomplete_beta(double a, double b, double x) {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const double front = std::exp(std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) +
                                a * std::log(x) + b * std::log1p(-x));
  if (x < (a + 1) / (a + b + 2)) return front * beta_fraction(a, b, x) / a;
  return 1 - front * beta_fraction(b, a, 1 - x) / b;
}

}  // namespace

double student_t_cdf(double x, double df) {
  if (!(df > 0)) throw std::invalid_argument("student_t_cdf: degrees of freedom must be > 0");
  const double tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + x * x));
  return x >= 0 ? 1 - tail : tail;
}

double student_t_quantile(double p, double df) {
  if (!(p > 0 && p < 1)) throw std::invalid_argument("student_t_quantile: p must be in (0, 1)");
  if (!(df > 0)) throw std::invalid_argument("student_t_quantile: degrees of freedom must be > 0");
  if (p == 0.5) return 0;
  if (p < 0.5) return -student_t_quantile(1 - p, df);
  // Bracket, then bisect the CDF (monotone): 200 halvings reach double precision.
  double lo = 0, hi = 1;
  while (student_t_cdf(hi, df) < p) hi *= 2;
  for (int i = 0; i < 200 && hi - lo > 1e-14 * hi; ++i) {
    const double mid = 0.5 * (lo + hi);
    (student_t_cdf(mid, df) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

bool Interval::excludes_zero() const { return n >= 2 && (lo > 0 || hi < 0); }

std::string Interval::text(int prec) const {
  char b[96];
  if (n >= 2 && std::isfinite(half)) {
    std::snprintf(b, sizeof(b), "%.*f ± %.*f", prec, mean, prec, half);
  } else {
    std::snprintf(b, sizeof(b), "%.*f", prec, mean);
  }
  return b;
}

Interval mean_interval(const std::vector<double>& x, double level) {
  if (x.empty()) throw std::invalid_argument("mean_interval: no values");
  if (!(level > 0 && level < 1)) throw std::invalid_argument("mean_interval: level in (0, 1)");
  Interval r;
  r.n = static_cast<int>(x.size());
  for (double v : x) r.mean += v;
  r.mean /= r.n;
  if (r.n < 2) {
    r.half = r.lo = r.hi = std::numeric_limits<double>::quiet_NaN();
    return r;
  }
  double ss = 0;
  for (double v : x) ss += (v - r.mean) * (v - r.mean);
  r.sd = std::sqrt(ss / (r.n - 1));
  r.half = student_t_quantile(0.5 + level / 2, r.n - 1) * r.sd / std::sqrt(double(r.n));
  r.lo = r.mean - r.half;
  r.hi = r.mean + r.half;
  return r;
}

Interval paired_interval(const std::vector<double>& a, const std::vector<double>& b,
                         double level) {
  if (a.size() != b.size()) throw std::invalid_argument("paired_interval: unequal lengths");
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return mean_interval(d, level);
}

double normal_quantile(double p) {
  if (!(p > 0 && p < 1)) throw std::invalid_argument("normal_quantile: p must be in (0, 1)");
  // Bisection on the CDF 0.5 erfc(-x / sqrt 2): 200 halvings of [-40, 40] reach double precision.
  double lo = -40, hi = 40;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p) lo = mid; else hi = mid;
  }
  return 0.5 * (lo + hi);
}

Proportion wilson_interval(int64_t k, int64_t n, double level) {
  Proportion r;
  r.k = k;
  r.n = n;
  if (n <= 0) {
    r.p = r.lo = r.hi = std::nan("");
    return r;
  }
  const double z = normal_quantile(0.5 + level / 2), nn = static_cast<double>(n);
  r.p = static_cast<double>(k) / nn;
  const double z2 = z * z, denom = 1 + z2 / nn, centre = r.p + z2 / (2 * nn);
  const double half = z * std::sqrt(r.p * (1 - r.p) / nn + z2 / (4 * nn * nn));
  r.lo = std::max(0.0, (centre - half) / denom);
  r.hi = std::min(1.0, (centre + half) / denom);
  return r;
}

}  // namespace mixdiff
