// See fused_kernels.h. Compiled at -O3 without errno on sqrt (CMakeLists.txt).
#include "nn/fused_kernels.h"

#include <cmath>

#include "core/vector_clones.h"
#include <cstring>

namespace mixdiff::kernels {

void rmsnorm_forward(const float* __restrict x, const float* __restrict w, float* __restrict y,
                     float* __restrict rstd, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const float s = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    rstd[r] = s;
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * s * w[j];
  }
}

void rmsnorm_backward(const float* __restrict dy, const float* __restrict x,
                      const float* __restrict w, const float* __restrict rstd,
                      float* __restrict dx, float* __restrict dw, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    const float* gr = dy + r * d;
    float* dxr = dx + r * d;
    const float s = rstd[r];
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(gr[j]) * w[j] * xr[j];
    const float c = static_cast<float>(dot / static_cast<double>(d)) * s * s;
    for (int64_t j = 0; j < d; ++j) {
      dxr[j] = s * (gr[j] * w[j] - xr[j] * c);
      dw[j] += gr[j] * xr[j] * s;
    }
  }
}

void rotary(const float* __restrict x, const float* __restrict cos, const float* __restrict sin,
            float* __restrict y, int64_t B, int64_t L, int64_t H, int64_t hd, bool transpose) {
  const int64_t half = hd / 2;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      const float* c = cos + l * hd;
      const float* s = sin + l * hd;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t off = ((b * L + l) * H + h) * hd;
        const float* xr = x + off;
        float* yr = y + off;
        if (!transpose) {
          for (int64_t j = 0; j < half; ++j) yr[j] = xr[j] * c[j] + xr[j + half] * s[j];
          for (int64_t j = half; j < hd; ++j) yr[j] = xr[j] * c[j] + xr[j - half] * s[j];
        } else {
          for (int64_t j = 0; j < half; ++j) yr[j] = xr[j] * c[j] + xr[j + half] * s[j + half];
          for (int64_t j = half; j < hd; ++j) yr[j] = xr[j] * c[j] + xr[j - half] * s[j - half];
        }
      }
    }
  }
}

MIXDIFF_VECTOR_CLONES
void gemm_nt_skinny(const float* __restrict X, int64_t n, const float* __restrict W, int64_t N,
                    int64_t K, float* __restrict C, int64_t ldc) {
  typedef float v16 __attribute__((vector_size(64)));
  const int64_t K16 = K / 16 * 16;
  for (int64_t j = 0; j < N; ++j) {
    const float* w = W + j * K;
    for (int64_t r = 0; r < n; ++r) {
      const float* x = X + r * K;
      v16 acc = {};
      for (int64_t k = 0; k < K16; k += 16) {
        v16 a, b;
        std::memcpy(&a, x + k, sizeof a);
        std::memcpy(&b, w + k, sizeof b);
        acc += a * b;
      }
      float s = 0;
      for (int i = 0; i < 16; ++i) s += acc[i];
      for (int64_t k = K16; k < K; ++k) s += x[k] * w[k];
      C[r * ldc + j] = s;
    }
  }
}

}  // namespace mixdiff::kernels
