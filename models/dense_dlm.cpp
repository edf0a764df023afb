// dense_dlm: the bidirectional transformer of masked diffusion LMs (LLaDA, arXiv 2502.09992;
// algorithms.md section 1.2): no causal mask and no timestep input. Token embedding with a
// reserved [MASK] row, pre-norm blocks (RMSNorm, rotary attention with optional grouped KV heads
// and QK-norm, SwiGLU), final RMSNorm, tied or untied output head over the V real tokens.
// `attention: block_causal` lets a token see its own block and earlier blocks only (BD3-LM,
// arXiv 2503.09573, algorithms.md 1.6), the mask that block diffusion decoding needs.
#include <torch/torch.h>

#include "core/errors.h"
#include "model/model.h"
#include "nn/layers.h"

namespace mixdiff {
namespace {

struct DenseDlmOptions {
  int64_t vocab_size = 0;
  int64_t d_model = 256;
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_kv_head = 4;
  int64_t head_dim = 64;
  int64_t d_ff = 704;
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;
  bool qk_norm = false;
  bool tie_embeddings = true;
  std::string attention = "full";
  int64_t block_size = 32;
  double norm_eps = 1e-6;
  double init_std = 0.02;

  static DenseDlmOptions from(const ConfigNode& c) {
    DenseDlmOptions o;
    o.vocab_size = c.get<int64_t>("vocab_size");
    o.d_model = c.get<int64_t>("d_model");
    o.n_layer = c.get<int64_t>("n_layer");
    o.n_head = c.get<int64_t>("n_head");
    o.n_kv_head = c.get<int64_t>("n_kv_head", o.n_head);
    if (o.d_model <= 0 || o.n_layer <= 0 || o.n_head <= 0) {
      c.fail("", "d_model, n_layer and n_head must be positive");
    }
    if (o.n_kv_head <= 0 || o.n_head % o.n_kv_head != 0) {
      c.fail("n_kv_head", str("expected a divisor of n_head (", o.n_head, "), got ", o.n_kv_head));
    }
    o.head_dim = c.get<int64_t>("head_dim", o.d_model / o.n_head);
    if (o.head_dim <= 0 || o.head_dim % 2 != 0) {
      c.fail("head_dim", str("expected a positive even number (rotary pairs), got ", o.head_dim));
    }
    // SwiGLU's usual width: 8/3 d_model rounded up to a multiple of 64.
    o.d_ff = c.get<int64_t>("d_ff", (8 * o.d_model / 3 + 63) / 64 * 64);
    o.max_seq_len = c.get<int64_t>("max_seq_len");
    o.rope_theta = c.get<double>("rope_theta", 10000.0);
    o.qk_norm = c.get<bool>("qk_norm", false);
    o.tie_embeddings = c.get<bool>("tie_embeddings", true);
    o.attention = c.get<std::string>("attention", "full");
    if (o.attention != "full" && o.attention != "block_causal") {
      c.fail("attention", "expected full or block_causal, got '" + o.attention + "'");
    }
    o.block_size = c.get<int64_t>("block_size", 32);
    if (o.block_size <= 0) c.fail("block_size", "expected a positive integer");
    o.norm_eps = c.get<double>("norm_eps", 1e-6);
    o.init_std = c.get<double>("init_std", 0.02);
    if (o.vocab_size <= 0 || o.d_ff <= 0 || o.max_seq_len <= 0) {
      c.fail("", "vocab_size, d_ff and max_seq_len must be positive");
    }
    return o;
  }
};

class DenseDlm : public ModelBase {
 public:
  explicit DenseDlm(const DenseDlmOptions& o) : o_(o) {
    AttentionOptions a{o.d_model, o.n_head, o.n_kv_head, o.head_dim, o.qk_norm, o.norm_eps};
    embed_ = register_parameter("embed", torch::empty({o.vocab_size + 1, o.d_model}));
    auto layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < o.n_layer; ++i) {
      blocks_.push_back(
          std::make_shared<TransformerBlock>(a, std::make_shared<SwiGLU>(o.d_model, o.d_ff)));
      layers->push_back(blocks_.back());
    }
    norm_ = register_module("norm", std::make_shared<RMSNorm>(o.d_model, o.norm_eps));
    if (!o.tie_embeddings) {
      head_ = register_parameter("head", torch::empty({o.vocab_size, o.d_model}));
    }
    init_transformer_weights(*this, o.init_std, o.n_layer);
    rope_ = RotaryTables::make(o.max_seq_len, o.head_dim, o.rope_theta);
  }

  ModelOutput forward(const ModelInput& in) override {
    const auto& tok = in.tokens_BL;
    TORCH_CHECK(tok.dim() == 2, "[dense_dlm] expected tokens_BL of rank 2, got ", tok.sizes());
    const int64_t B = tok.size(0), L = tok.size(1);
    TORCH_CHECK(L <= o_.max_seq_len, "[dense_dlm] sequence of ", L,
                " tokens exceeds model.max_seq_len = ", o_.max_seq_len);
    auto x = embed_.index_select(0, tok.reshape({-1})).view({B, L, o_.d_model});  // [B, L, D]
    at::Tensor bias;
    if (o_.attention == "block_causal") bias = block_causal_bias(L, o_.block_size);
    for (auto& blk : blocks_) x = blk->forward(x, rope_, bias);
    x = norm_->forward(x);
    if (in.logits_index_M.defined()) {
      x = x.reshape({B * L, o_.d_model}).index_select(0, in.logits_index_M);  // [M, D]
    }
    const at::Tensor w = head_.defined() ? head_ : embed_.narrow(0, 0, o_.vocab_size);
    return {torch::nn::functional::linear(x, w)};
  }

  int64_t vocab_size() const override { return o_.vocab_size; }
  int64_t max_seq_len() const override { return o_.max_seq_len; }
  std::string describe() const override {
    return str("dense_dlm: ", o_.n_layer, " layers, d_model ", o_.d_model, ", ", o_.n_head,
               " heads (", o_.n_kv_head, " KV), d_ff ", o_.d_ff, ", vocab ", o_.vocab_size,
               " + [MASK], ", o_.attention, " attention",
               o_.attention == "block_causal" ? str(" (block ", o_.block_size, ")") : "",
               o_.tie_embeddings ? ", tied head" : ", untied head");
  }

 private:
  DenseDlmOptions o_;
  at::Tensor embed_, head_;
  std::vector<std::shared_ptr<TransformerBlock>> blocks_;
  std::shared_ptr<RMSNorm> norm_;
  RotaryTables rope_;
};

MIXDIFF_REGISTER(models_registry(), "dense_dlm",
                 "bidirectional transformer dLLM (RMSNorm, RoPE, GQA, QK-norm, SwiGLU; full or "
                 "block-causal attention)",
                 [](const ConfigNode& c) -> std::shared_ptr<ModelBase> {
                   return std::make_shared<DenseDlm>(DenseDlmOptions::from(c));
                 });

}  // namespace
}  // namespace mixdiff
