// The one place where LibTorch versions differ (1.13 from Debian, 2.x from a PyTorch install).
// Everything else in MixDiff calls these wrappers instead of version-specific APIs.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/version.h>

#include <optional>

#define MIXDIFF_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||          \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace mixdiff::compat {

/// softmax(q k^T * scale + bias) v for q [B, H, L, hd], k/v [B, H, S, hd]; bias is an additive
/// float mask broadcastable to [B, H, L, S] or undefined. LibTorch >= 2.0 dispatches to the fused
/// kernels of at::scaled_dot_product_attention; 1.13 has only a private math path, so the same
/// math is written out.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& bias);

/// "1.13.0" or "2.5.1": the LibTorch this binary was built against.
const char* torch_version();

}  // namespace mixdiff::compat
