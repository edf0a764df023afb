// The AdamW update of one contiguous fp32 tensor in one pass (no LibTorch: its TU compiles in a
// second, at -O3 with one clone per x86 vector width, chosen at load time).
#pragma once

#include <cstdint>

namespace mixdiff {

struct AdamWScalars {
  float decay;      // 1 - lr * weight_decay
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
  float neg_step;   // -lr / (1 - beta1^step)
  float grad_scale; // gradient-clipping factor, 1 when not clipping
};

/// The scalars of one step from AdamW's options (double precision, then rounded to float).
inline AdamWScalars adamw_scalars(double lr, double weight_decay, double beta1, double beta2,
                                  double eps, double bc2_sqrt, double step_size,
                                  double grad_scale) {
  AdamWScalars k;
  k.decay = static_cast<float>(1 - lr * weight_decay);
  k.beta1 = static_cast<float>(beta1);
  k.beta2 = static_cast<float>(beta2);
  k.one_minus_beta1 = static_cast<float>(1 - beta1);
  k.one_minus_beta2 = static_cast<float>(1 - beta2);
  k.bc2_sqrt = static_cast<float>(bc2_sqrt);
  k.eps = static_cast<float>(eps);
  k.neg_step = static_cast<float>(-step_size);
  k.grad_scale = static_cast<float>(grad_scale);
  return k;
}

/// p = p * decay; m = m * b1 + (1 - b1) g'; v = v * b2 + (1 - b2) g'^2;
/// p += neg_step * m / (sqrt(v) / bc2_sqrt + eps), with g' = g * grad_scale: the operations, in
/// the same order and precision, of torch::optim::AdamW after clip_grad_norm_.
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s);

}  // namespace mixdiff
