#include "core/compat.h"

#include <torch/torch.h>

#include <cmath>

namespace mixdiff::compat {

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& bias) {
#if MIXDIFF_TORCH_AT_LEAST(2, 0)
  return at::scaled_dot_product_attention(q, k, v, bias.defined() ? c10::optional<at::Tensor>(bias)
                                                                  : c10::nullopt);
#else
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;  // [B, H, L, S]
  if (bias.defined()) scores = scores + bias;
  return torch::matmul(torch::softmax(scores, -1), v);
#endif
}

const char* torch_version() { return TORCH_VERSION; }

}  // namespace mixdiff::compat
