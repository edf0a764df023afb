// See adamw_kernel.h. Compiled with -O3 -fno-math-errno (CMakeLists.txt) so that the loop
// vectorises (sqrt and division included); restrict-qualified pointers spare the alias checks.
#include "train/adamw_kernel.h"

#include <cmath>

#include "core/vector_clones.h"

namespace mixdiff {

MIXDIFF_VECTOR_CLONES
void adamw_update(float* __restrict p, const float* __restrict g, float* __restrict m,
                  float* __restrict v, int64_t n, const AdamWScalars& s) {
  const float decay = s.decay, b1 = s.beta1, b2 = s.beta2, a1 = s.one_minus_beta1,
              a2 = s.one_minus_beta2, bc2 = s.bc2_sqrt, eps = s.eps, st = s.neg_step,
              gs = s.grad_scale;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    const float mi = m[i] * b1 + a1 * gi;
    const float vi = v[i] * b2 + a2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay + st * (mi / (std::sqrt(vi) / bc2 + eps));
  }
}

}  // namespace mixdiff
