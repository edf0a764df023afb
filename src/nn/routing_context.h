// What a feed-forward may condition on during one forward (algorithms.md 12.1 and 12.6): the
// layer, the diffusion state of every token, sequence membership (routing groups and
// sequence-level losses) and which positions are padding. It travels through every feed-forward
// of the backbone (nn/layers.h), so it lives with them; the MoE layer and its router read it
// (src/moe). Kept free of LibTorch's heavy headers.
#pragma once

#include <ATen/core/Tensor.h>

namespace mixdiff {

struct RoutingContext {
  int64_t layer = -1;       ///< index of the transformer block
  at::Tensor mask_ratio_B;  ///< fp32 fraction of [MASK] per sequence (the diffusion time proxy)
  at::Tensor is_masked_T;   ///< bool [T], token currently holds [MASK]
  at::Tensor seq_T;         ///< int64 [T], sequence index of each token (T = B * L, row-major)
  at::Tensor valid_T;       ///< bool [T], false for padding; undefined means every token is real
  int64_t n_seq = 0;        ///< B
  int64_t step = 0;         ///< optimizer step (training) or denoising step (inference)
  int64_t micro = 0;        ///< micro-batch of the optimizer step (training)
  at::Tensor visible_S;     ///< bool [S_real], router slots this forward may choose (undefined:
                            ///< all); set by the MoE layer (UniPool masks, ReXMoE's schedule)
  at::Tensor block_T;       ///< int64 [T], routing block of each token (block routing on)
  at::Tensor allowed_TS;    ///< bool [T, S_real], per-token slots allowed by a block routing
                            ///< policy (the token's block coreset); undefined: all
  bool probe = false;       ///< a routing pass that only informs a block policy: no state update
  at::Tensor domain_T;      ///< int64 [T], data domain of each token (-1 unknown; telemetry
                            ///< only, never routing); undefined: no domains
};

}  // namespace mixdiff
