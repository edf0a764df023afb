// Replicate statistics for sweeps: Student-t confidence intervals of a mean over seeds and of a
// paired difference (two configurations run with the same seeds, so the same data order and
// masks). No LibTorch here.
//
//   mean  m = (1/n) sum x_i,  s = sqrt(sum (x_i - m)^2 / (n - 1)),  half = t_{1-a/2, n-1} s / sqrt(n)
//   paired: the interval of the mean of d_i = x_i - y_i over the seeds both configurations ran
//
// With one value there is no interval (half = NaN); an interval "excludes zero" when lo > 0 or
// hi < 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mixdiff {

/// Quantile of Student's t with `df` degrees of freedom (df > 0, 0 < p < 1).
double student_t_quantile(double p, double df);

/// CDF of Student's t with `df` degrees of freedom.
double student_t_cdf(double x, double df);

struct Interval {
  int n = 0;
  double mean = 0, sd = 0, half = 0, lo = 0, hi = 0;  ///< half, lo, hi NaN when n < 2
  bool excludes_zero() const;
  /// "5.7600 ± 0.1234" (or "5.7600" for one value); `prec` decimals.
  std::string text(int prec = 4) const;
};

/// Mean of `x` with its `level` (two-sided) Student-t interval. Throws std::invalid_argument
/// on an empty sample.
Interval mean_interval(const std::vector<double>& x, double level = 0.95);

/// Interval of the mean paired difference a_i - b_i; a and b have the same length.
Interval paired_interval(const std::vector<double>& a, const std::vector<double>& b,
                         double level = 0.95);

/// Wilson score interval of a binomial proportion k / n (accuracy over n items), `level`
/// two-sided: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z the normal quantile.
/// Unlike the normal approximation it stays in [0, 1] and is sound at 0 or n successes.
struct Proportion {
  int64_t k = 0, n = 0;
  double p = 0, lo = 0, hi = 0;  ///< NaN when n = 0
};
Proportion wilson_interval(int64_t k, int64_t n, double level = 0.95);

/// Quantile of the standard normal distribution (0 < p < 1).
double normal_quantile(double p);

}  // namespace mixdiff
