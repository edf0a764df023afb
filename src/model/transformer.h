// The transformer backbone of MixDiff's diffusion LMs (LLaDA, arXiv 2502.09992; algorithms.md
// section 1.2): bidirectional attention and no timestep input. Token embedding with a reserved
// [MASK] row, pre-norm blocks (RMSNorm, rotary attention with optional grouped KV heads and
// QK-norm, a feed-forward per block), final RMSNorm, tied or untied output head over the V real
// tokens. `attention: block_causal` lets a token see its own block and earlier blocks only
// (BD3-LM, arXiv 2503.09573, algorithms.md 1.6), the mask that block diffusion decoding needs.
//
// What differs between architectures is the feed-forward of each block: models/ registers a
// model kind by handing TransformerDlm a factory for it (dense SwiGLU, MoE layers, ...). The
// backbone builds the RoutingContext of each forward (mask flags and mask ratio per sequence,
// sequence ids, padding) that MoE layers route with.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/model.h"
#include "nn/layers.h"

namespace mixdiff {

struct TransformerOptions {
  int64_t vocab_size = 0;
  int64_t d_model = 256;
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_kv_head = 4;
  int64_t head_dim = 64;
  int64_t d_ff = 704;  ///< dense SwiGLU width
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;
  bool qk_norm = false;
  bool qk_norm_projection = false;  ///< qk_norm: projection (one norm over all heads)
  bool qkv_bias = false;
  bool tie_embeddings = true;
  std::string attention = "full";
  int64_t block_size = 32;
  double norm_eps = 1e-6;
  double init_std = 0.02;
  /// Reads the backbone keys of the recipe's `model` section.
  static TransformerOptions from(const ConfigNode& c);
};

/// Builds the feed-forward of block `layer`.
using FeedForwardFactory = std::function<std::shared_ptr<FeedForward>(int64_t layer)>;

/// Modules the blocks share (an expert pool used by several layers), registered once on the
/// model under their name before the weights are initialised.
using SharedModules = std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>;

/// Which blocks of an MoE model are MoE: `moe.layer_pattern` (one letter per block, D or M) or
/// all but the first `moe.first_k_dense`. Reads those keys of `moe`.
std::string read_block_pattern(const ConfigNode& moe, int64_t n_layer);

class TransformerDlm : public ModelBase {
 public:
  /// `kind` names the model in describe().
  TransformerDlm(const TransformerOptions& o, const FeedForwardFactory& ffn, std::string kind,
                 const SharedModules& shared = {});

  ModelOutput forward(const ModelInput& in) override;
  int64_t vocab_size() const override { return o_.vocab_size; }
  int64_t max_seq_len() const override { return o_.max_seq_len; }
  std::string describe() const override;
  int64_t num_active_parameters(const std::vector<double>& experts_per_token = {}) const override;
  double train_flops_per_token(int64_t seq_len,
                               const std::vector<double>& experts_per_token = {}) const override;
  bool experts_per_token_data_dependent() const override;
  std::vector<MoeLayer*> moe_layers() override { return moe_; }
  void set_block_routing(std::shared_ptr<BlockRoutingPolicy> policy, int64_t block_size) override;
  std::string set_activation_checkpointing(const ActivationCheckpointing& ac) override;
  void set_block_hook(std::function<void(int64_t)> hook) override { block_hook_ = std::move(hook); }
  std::string attention() const override { return o_.attention; }
  int64_t attention_block() const override { return o_.block_size; }
  const TransformerOptions& options() const { return o_; }

 private:
  TransformerOptions o_;
  std::string kind_;
  std::string pattern_;  ///< one letter per block: D dense, M MoE
  at::Tensor embed_, head_;
  std::vector<std::shared_ptr<TransformerBlock>> blocks_;
  std::vector<MoeLayer*> moe_;
  std::shared_ptr<RMSNorm> norm_;
  RotaryTables rope_;
  int64_t routing_block_ = 0;  ///< > 0: block routing is on, with blocks of this many positions
  ActivationCheckpointing ac_;
  std::function<void(int64_t)> block_hook_;
};

}  // namespace mixdiff
