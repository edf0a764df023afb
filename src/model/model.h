// The model contract: a diffusion LM maps (possibly masked) tokens to logits over the tokenizer's
// vocabulary. Models are built by name from the `models` registry.
//
// Vocabulary convention: the tokenizer has V tokens (ids 0..V-1). The model's embedding has V+1
// rows; row V is the reserved [MASK] token (`mask_id() == vocab_size()`). The output head
// predicts the V real tokens only, so [MASK] can never be predicted or sampled.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/registry.h"
#include "nn/checkpoint.h"
#include "nn/layers.h"

namespace mixdiff {

class MoeLayer;
class BlockRoutingPolicy;

/// Keys and values of every layer for the positions decoded so far (block diffusion decoding:
/// the clean prefix is encoded once and extended block by block).
/// Positions are the sequence's layout indices 0..length-1; a forward either extends the cache
/// (its tokens follow the cached ones) or, with ModelInput::cache_at, stands in for the cached
/// tokens at [cache_at, cache_at + L) (Fast-dLLM's dual cache: the prefix and the suffix cached
/// around the current block).
struct KVCache {
  std::vector<LayerKV> layers;
  at::Tensor valid_BK;  ///< bool [B, length]: false at padding (undefined: all real)
  int64_t length() const { return layers.empty() || !layers[0].k.defined() ? 0 : layers[0].k.size(2); }
  void clear() {
    layers.clear();
    valid_BK = at::Tensor();
  }
  /// Keeps the first `n` positions (Fast-dLLM's prefix cache after a full forward).
  void truncate(int64_t n);
};

struct ModelInput {
  ModelInput(at::Tensor tokens, at::Tensor index = {})
      : tokens_BL(std::move(tokens)), logits_index_M(std::move(index)) {}
  at::Tensor tokens_BL;     ///< int64 [B, L], may hold mask_id()
  /// Optional int64 [M] indices into the flattened [B*L] positions. When defined, logits are
  /// computed only there ([M, V]): a training step needs logits at masked positions only, and
  /// the output projection is the largest matmul of a small model.
  at::Tensor logits_index_M;
  /// Optional bool [B, L]: false at padding positions, which never count in routing statistics
  /// or routing losses. Undefined: every position is real.
  at::Tensor valid_BL;
  /// Optimizer step and micro-batch of this forward (training): routing schedules (ReXMoE's
  /// progressive candidate pool) and routing noise (ERC) depend on them, so that resumed runs
  /// route and draw the same. At inference `step` is the denoising step inside the current
  /// block (0 at the block's first forward; interval-refresh block routing reads it); a
  /// validation forward is step 0.
  int64_t step = 0;
  int64_t micro = 0;
  /// Optional int64 [B, L]: the data domain of each token (the corpus of its document; -1
  /// unknown). Read by routing telemetry only (expert specialisation by domain).
  at::Tensor domain_BL;
  /// Rotary positions of the L tokens: int64 [L], or [B, L] per row (a left-padded batch gives
  /// each row the positions it has alone); undefined: the layout indices (0..L-1 after the cache).
  at::Tensor positions_L;
  /// Where blocks start, as a layout index: block-causal attention blocks and block-routing
  /// blocks are floor((i - block_origin) / block size) of the layout index i. Samplers set it to
  /// the prompt's end (blocks start where generation starts, as LLaDA's and Fast-dLLM's blocks
  /// do; the prompt is cut into blocks backwards from its end); a training window has no prompt:
  /// 0.
  int64_t block_origin = 0;
  /// BD3's [x_t ; x_0] input: only the first `noisy_len` positions of a row are the noisy
  /// sequence whose [MASK] fraction routing and its telemetry read (0: every position).
  int64_t noisy_len = 0;
  /// Additive attention bias [L, Lk] that replaces the model's own (BD3 training's mask).
  at::Tensor attn_bias;
  /// With a cache the tokens also attend to the cached positions; `cache_append` adds them.
  KVCache* cache = nullptr;
  bool cache_append = false;
  /// >= 0: the tokens replace the cached positions [cache_at, cache_at + L) for this forward
  /// (read-only; the cache must cover them); -1: they follow the cache.
  int64_t cache_at = -1;
};

struct ModelOutput {
  at::Tensor logits;  ///< fp32 [B, L, V], or [M, V] when logits_index_M was given
};

class ModelBase : public torch::nn::Module {
 public:
  virtual ModelOutput forward(const ModelInput& in) = 0;
  /// Size V of the tokenizer vocabulary (output classes).
  virtual int64_t vocab_size() const = 0;
  int64_t mask_id() const { return vocab_size(); }
  /// Longest sequence the positional tables cover.
  virtual int64_t max_seq_len() const = 0;
  /// One line: kind and sizes.
  virtual std::string describe() const = 0;
  /// Parameter count (unique tensors).
  int64_t num_parameters() const;
  /// Parameters one token's forward uses; dense models: all. Routed experts count k of E per
  /// MoE layer, with k from `experts_per_token` (one value per moe_layers() entry: a run's
  /// measured mean of real experts per token, which is what top-p, null experts and capacity
  /// drops need) or, when empty, each router's planned count (RouterBase::
  /// planned_experts_per_token; its top_k() where that is unknown).
  virtual int64_t num_active_parameters(const std::vector<double>& experts_per_token = {}) const {
    return num_parameters();
  }
  /// Training FLOPs per token (forward + backward) at sequence length `seq_len`: 6 per active
  /// matmul weight (embedding lookups excluded, the output head and the routers included) plus
  /// attention's score and value products, 12 L (heads x head_dim) per layer (Kaplan et al.
  /// 2020's count); routed experts counted as in num_active_parameters.
  virtual double train_flops_per_token(int64_t seq_len,
                                       const std::vector<double>& experts_per_token = {}) const {
    return 6.0 * static_cast<double>(num_active_parameters(experts_per_token));
  }
  /// Whether some router's experts per token are known only from a run (planned count NaN).
  virtual bool experts_per_token_data_dependent() const { return false; }
  /// The model's MoE layers in depth order (empty for dense models): the trainer attaches
  /// routing losses, balancing updates and telemetry through them.
  virtual std::vector<MoeLayer*> moe_layers() { return {}; }
  /// Block-level routing (algorithms.md section 10): the policy restricts the experts that the
  /// tokens of each block of `block_size` positions may use (null: token-level routing).
  virtual void set_block_routing(std::shared_ptr<BlockRoutingPolicy> policy, int64_t block_size) {}
  /// Which activations training forwards recompute in the backward (train.activation_
  /// checkpointing, nn/checkpoint.h). Returns why the model cannot do `ac` ("" when it can).
  virtual std::string set_activation_checkpointing(const ActivationCheckpointing& ac) {
    return ac.mode == ActivationCheckpointing::Mode::kNone
               ? ""
               : "this model kind does not support activation checkpointing";
  }
  /// Called with -1 after the embedding and with i after block i of every forward (the memory
  /// plan's probe, train/memory_plan.h); empty: none.
  virtual void set_block_hook(std::function<void(int64_t)> hook) {}
  /// Attention kind: "full" or "block_causal".
  virtual std::string attention() const { return "full"; }
  virtual int64_t attention_block() const { return 0; }
};

using ModelRegistry = Registry<std::shared_ptr<ModelBase>, const ConfigNode&>;
ModelRegistry& models_registry();

/// Builds the model of `model_cfg` (the recipe's `model` section) by its `kind`.
std::shared_ptr<ModelBase> build_model(const ConfigNode& model_cfg);

/// Where a module's parameters live; `fallback` for a module without parameters.
at::Device module_device(const torch::nn::Module& m, const at::Device& fallback = at::kCPU);

}  // namespace mixdiff
