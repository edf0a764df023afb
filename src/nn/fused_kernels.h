// Row kernels for RMSNorm and rotary embeddings, forward and backward, each one pass over its
// rows (the composite LibTorch versions take six and ten passes with temporaries). No LibTorch:
// the autograd wrappers are in layers.cpp. All arrays are contiguous fp32.
#pragma once

#include <cstdint>

namespace mixdiff::kernels {

/// y = x * rstd * w per row of d, rstd = 1 / sqrt(mean(x^2) + eps) (stored per row).
void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows,
                     int64_t d, float eps);

/// dx = rstd * (g - x * rstd^2 * mean(g * x)), g = dy * w;  dw += sum over rows of dy * x * rstd.
void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd,
                      float* dx, float* dw, int64_t rows, int64_t d);

/// Rotary embedding of x [B, L, H, hd] with per-position tables cos, sin [L, hd]
/// (sin carries rotate_half's sign: [-sin, sin]): y_j = x_j cos_j + x_{j'} sin_j, j' = j +- hd/2.
/// With `transpose` the same map backward: dx_k = dy_k cos_k + dy_{k'} sin_{k'}.
void rotary(const float* x, const float* cos, const float* sin, float* y, int64_t B, int64_t L,
            int64_t H, int64_t hd, bool transpose);

/// C [n, N] (row stride ldc) = X [n, K] W^T for W [N, K], both row-major: dot products that read
/// each weight row once and reuse it from L1 for all n rows. For the few rows per expert of a
/// decoding forward, where a BLAS GEMM spends most of its time packing the weights.
void gemm_nt_skinny(const float* X, int64_t n, const float* W, int64_t N, int64_t K, float* C,
                    int64_t ldc);

}  // namespace mixdiff::kernels
