// Shared transformer building blocks: RMSNorm, rotary positions, multi-head attention with
// grouped KV heads and optional QK-norm, the SwiGLU feed-forward, and a pre-norm block whose
// feed-forward is pluggable (dense SwiGLU here; MoE layers implement the same interface).
//
// Weights are plain parameters laid out [out, in] (as torch.nn.Linear) so that their names in
// model.safetensors are short and stable: `layers.3.attn.wqkv`, `layers.3.ffn.w_down`, ...
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>
#include <vector>

#include "nn/routing_context.h"

namespace mixdiff {

/// y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension. fp32 CPU tensors take one
/// fused pass forward and one backward (nn/fused_kernels.h); others the composite form.
class RMSNorm : public torch::nn::Module {
 public:
  RMSNorm(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  at::Tensor weight_;
  double eps_;
};

/// cos/sin tables of rotary embeddings (GPT-NeoX/LLaMA "rotate half" layout).
struct RotaryTables {
  at::Tensor cos_LH;  ///< [max_len, head_dim], fp32
  at::Tensor sin_LH;  ///< [max_len, head_dim], fp32, sign folded in for the rotate-half form
  static RotaryTables make(int64_t max_len, int64_t head_dim, double theta);
};

/// x [B, H, L, hd] rotated by positions 0..L-1 of the tables, or by `pos_L` (int64 [L], or
/// [B, L]: one row of positions per sequence).
at::Tensor apply_rotary(const at::Tensor& x_BHLd, const RotaryTables& rope,
                        const at::Tensor& pos_L = {});
/// The same for x [B, L, H, hd] (the layout the QKV projection produces); returns that layout.
at::Tensor apply_rotary_BLHd(const at::Tensor& x_BLHd, const RotaryTables& rope,
                             const at::Tensor& pos_L = {});

/// Additive attention bias [L, L]: 0 where query i may see key j, -inf elsewhere.
/// block_causal: key block (j / block_size) <= query block (i / block_size).
at::Tensor block_causal_bias(int64_t L, int64_t block_size);
/// The same for queries at positions q_pos [Lq] and keys at k_pos [Lk] (a KV-cached forward).
at::Tensor block_causal_bias(const at::Tensor& q_pos, const at::Tensor& k_pos, int64_t block_size);

/// BD3-LM's vectorised training mask (arXiv 2503.09573; algorithms.md 1.6) for the input
/// [x_t ; x_0] of length 2L (both halves at positions 0..L-1), additive [2L, 2L]:
///   noisy query -> noisy key of the same block (bidirectional within a block);
///   noisy query -> clean key of a strictly earlier block;
///   clean query -> clean key of the same or an earlier block (block-causal clean half).
at::Tensor bd3_training_bias(int64_t L, int64_t block_size);

/// Keys and values of one attention layer for the positions already seen (after rotary, before
/// grouped-query expansion): [B, Hkv, Lc, hd].
struct LayerKV {
  at::Tensor k, v;
};

struct AttentionOptions {
  int64_t d_model = 0;
  int64_t n_head = 0;
  int64_t n_kv_head = 0;  ///< divides n_head; < n_head gives grouped-query attention
  int64_t head_dim = 0;
  bool qk_norm = false;   ///< RMSNorm over head_dim on q and k before rotary
  double norm_eps = 1e-6;
  /// With qk_norm: one RMSNorm over the whole q (H hd) and k (Hkv hd) projection (OLMoE) instead
  /// of one per head (Qwen3).
  bool qk_norm_projection = false;
  bool qkv_bias = false;  ///< a bias on the q, k, v projections (Qwen2): `bqkv` [(H + 2 Hkv) hd]
};

class Attention : public torch::nn::Module {
 public:
  explicit Attention(const AttentionOptions& o);
  /// x_BLD [B, L, D]; bias undefined (full attention) or broadcastable to [B, H, L, Lk].
  /// `pos_L`: rotary positions of the L queries ([L] or [B, L]; undefined: 0..L-1). With `kv`,
  /// the queries also attend to the cached keys: before their own, or with `at` >= 0 in place of
  /// the cached keys [at, at + L) (read-only); `append` adds this forward's keys to the cache.
  at::Tensor forward(const at::Tensor& x_BLD, const RotaryTables& rope, const at::Tensor& bias,
                     const at::Tensor& pos_L = {}, LayerKV* kv = nullptr, bool append = false,
                     int64_t at = -1);

 private:
  AttentionOptions o_;
  at::Tensor wqkv_;  ///< [(H + 2 Hkv) hd, D]
  at::Tensor bqkv_;  ///< [(H + 2 Hkv) hd] or undefined
  at::Tensor wo_;    ///< [D, H hd]
  std::shared_ptr<RMSNorm> q_norm_, k_norm_;
};

/// A token-wise feed-forward: dense SwiGLU or an MoE layer. `ctx` (may be null) tells an MoE
/// layer what its router may condition on; a dense FFN ignores it.
class MoeLayer;

class FeedForward : public torch::nn::Module {
 public:
  virtual at::Tensor forward(const at::Tensor& x_BLD, const RoutingContext* ctx) = 0;
  /// The block's feed-forward half: h + ffn(normed). A feed-forward with its own residual
  /// topology (Chain-of-Experts) overrides it.
  virtual at::Tensor residual(const at::Tensor& h, const at::Tensor& normed,
                              const RoutingContext* ctx) {
    return h + forward(normed, ctx);
  }
  /// The routed MoE layers inside (one for an MoE layer, C for Chain-of-Experts, none if dense).
  virtual std::vector<MoeLayer*> routed_layers() { return {}; }
};

/// w_down (silu(w_gate x) * (w_up x)); w_gate, w_up [F, D], w_down [D, F].
class SwiGLU : public FeedForward {
 public:
  SwiGLU(int64_t d_model, int64_t d_ff);
  at::Tensor forward(const at::Tensor& x_BLD, const RoutingContext* ctx = nullptr) override;

 private:
  at::Tensor w_gate_, w_up_, w_down_;
};

/// Pre-norm block: h = x + attn(norm(x)); y = h + ffn(norm(h)).
class TransformerBlock : public torch::nn::Module {
 public:
  TransformerBlock(const AttentionOptions& attn, std::shared_ptr<FeedForward> ffn);
  at::Tensor forward(const at::Tensor& x_BLD, const RotaryTables& rope, const at::Tensor& bias,
                     const RoutingContext* ctx = nullptr, const at::Tensor& pos_L = {},
                     LayerKV* kv = nullptr, bool append = false, int64_t at = -1);
  FeedForward& ffn() { return *ffn_; }
  std::shared_ptr<FeedForward> ffn_ptr() const { return ffn_; }
  /// Recompute the feed-forward half (norm, feed-forward, residual) in the backward of training
  /// forwards (nn/checkpoint.h): only its input h is kept.
  void set_checkpoint_ffn(bool on) { checkpoint_ffn_ = on; }

 private:
  bool checkpoint_ffn_ = false;
  std::shared_ptr<RMSNorm> attn_norm_, ffn_norm_;
  std::shared_ptr<Attention> attn_;
  std::shared_ptr<FeedForward> ffn_;
};

/// Initialises every parameter of `m`: matrices N(0, std), except the residual output
/// projections (names ending in `.wo` or `.w_down`), which get std / sqrt(2 n_layer);
/// 1-D parameters (norm gains) are set to 1.
void init_transformer_weights(torch::nn::Module& m, double std, int64_t n_layer);

}  // namespace mixdiff
