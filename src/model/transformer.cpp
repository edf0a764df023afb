#include "model/transformer.h"
#include "model/moe_model.h"

#include "core/profile.h"

#include <torch/torch.h>

#include "core/errors.h"
#include "moe/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

namespace mixdiff {

TransformerOptions TransformerOptions::from(const ConfigNode& c) {
  TransformerOptions o;
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
  // qk_norm: false, true (= head: per head, Qwen3) or projection (the whole projection, OLMoE).
  std::string qk = c.get<std::string>("qk_norm", "false");
  if (qk == "True" || qk == "False") qk = qk == "True" ? "true" : "false";  // as booleans read
  if (qk != "false" && qk != "true" && qk != "head" && qk != "projection") {
    c.fail("qk_norm", "expected false, true (per head), head or projection, got '" + qk + "'");
  }
  o.qk_norm = qk != "false";
  o.qk_norm_projection = qk == "projection";
  o.qkv_bias = c.get<bool>("qkv_bias", false);
  o.tie_embeddings = c.get<bool>("tie_embeddings", true);
  o.attention = c.get<std::string>("attention", "full");
  if (o.attention != "full" && o.attention != "block_causal" && o.attention != "causal") {
    c.fail("attention", "expected full, block_causal or causal, got '" + o.attention + "'");
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

std::string read_block_pattern(const ConfigNode& moe, int64_t n_layer) {
  const int64_t first_dense = moe.get<int64_t>("first_k_dense", 0);
  if (first_dense < 0 || first_dense > n_layer) {
    moe.fail("first_k_dense", str("expected 0..n_layer (", n_layer, "), got ", first_dense));
  }
  std::string pattern = moe.get<std::string>("layer_pattern", "");
  if (pattern.empty()) {
    return std::string(static_cast<size_t>(first_dense), 'D') +
           std::string(static_cast<size_t>(n_layer - first_dense), 'M');
  }
  if (static_cast<int64_t>(pattern.size()) != n_layer ||
      pattern.find_first_not_of("DM") != std::string::npos) {
    moe.fail("layer_pattern",
             str("expected ", n_layer, " letters D (dense) or M (MoE), got '", pattern, "'"));
  }
  return pattern;
}

namespace {
int64_t count_moe_blocks(const std::string& pattern, const ConfigNode& moe,
                         const std::string& name) {
  const auto n = static_cast<int64_t>(std::count(pattern.begin(), pattern.end(), 'M'));
  if (n == 0) moe.fail("layer_pattern", name + " needs at least one MoE block");
  return n;
}
}  // namespace

MoeModelRecipe::MoeModelRecipe(const ConfigNode& model, const std::string& name)
    : backbone(TransformerOptions::from(model)),
      moe(model.at("moe")),
      pattern(read_block_pattern(moe, backbone.n_layer)),
      n_moe(count_moe_blocks(pattern, moe, name)),
      options(MoeOptions::from(moe, backbone.d_model)),
      router(moe.at("router")) {}

std::shared_ptr<RouterBase> MoeModelRecipe::make_router(int64_t n_candidates) const {
  return routers_registry().create(router.get<std::string>("kind"), router.path() + ".kind",
                                   router, RouterDims{backbone.d_model, n_candidates});
}

std::shared_ptr<ModelBase> MoeModelRecipe::build(
    const std::function<std::shared_ptr<FeedForward>(int64_t moe_index)>& moe_block,
    std::string kind, const SharedModules& shared) const {
  int64_t moe_index = 0;
  return std::make_shared<TransformerDlm>(
      backbone,
      [&](int64_t layer) -> std::shared_ptr<FeedForward> {
        if (pattern[static_cast<size_t>(layer)] == 'D') {
          return std::make_shared<SwiGLU>(backbone.d_model, backbone.d_ff);
        }
        return moe_block(moe_index++);
      },
      std::move(kind), shared);
}

TransformerDlm::TransformerDlm(const TransformerOptions& o, const FeedForwardFactory& ffn,
                               std::string kind, const SharedModules& shared)
    : o_(o), kind_(std::move(kind)) {
  for (const auto& [name, m] : shared) register_module(name, m);
  AttentionOptions a{o.d_model,   o.n_head,   o.n_kv_head,          o.head_dim,
                     o.qk_norm,   o.norm_eps, o.qk_norm_projection, o.qkv_bias};
  embed_ = register_parameter("embed", torch::empty({o.vocab_size + 1, o.d_model}));
  auto layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.n_layer; ++i) {
    auto f = ffn(i);
    const auto routed = f->routed_layers();
    for (MoeLayer* m : routed) {
      m->set_block_index(i);
      moe_.push_back(m);
    }
    pattern_ += routed.empty() ? 'D' : 'M';
    blocks_.push_back(std::make_shared<TransformerBlock>(a, std::move(f)));
    layers->push_back(blocks_.back());
  }
  norm_ = register_module("norm", std::make_shared<RMSNorm>(o.d_model, o.norm_eps));
  if (!o.tie_embeddings) {
    head_ = register_parameter("head", torch::empty({o.vocab_size, o.d_model}));
  }
  init_transformer_weights(*this, o.init_std, o.n_layer);
  rope_ = RotaryTables::make(o.max_seq_len, o.head_dim, o.rope_theta);
}

void TransformerDlm::set_block_routing(std::shared_ptr<BlockRoutingPolicy> policy,
                                       int64_t block_size) {
  routing_block_ = policy ? block_size : 0;
  for (MoeLayer* m : moe_) m->set_block_routing(policy);
}

std::string TransformerDlm::set_activation_checkpointing(const ActivationCheckpointing& ac) {
  using Mode = ActivationCheckpointing::Mode;
  if (ac.mode == Mode::kMoe && moe_.empty()) {
    return "moe recomputes the routed feed-forwards, and " + kind_ + " has none (use blocks)";
  }
  if (ac.mode == Mode::kEveryK && (ac.every < 1 || ac.every > o_.n_layer)) {
    return str("every_k needs k in 1..n_layer (", o_.n_layer, "), got ", ac.every);
  }
  ac_ = ac;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    blocks_[i]->set_checkpoint_ffn(ac.mode == Mode::kMoe && pattern_[i] == 'M');
  }
  return "";
}

ModelOutput TransformerDlm::forward(const ModelInput& in) {
  TORCH_CHECK(in.tokens_BL.dim() == 2, "[", kind_, "] expected tokens_BL of rank 2, got ",
              in.tokens_BL.sizes());
  // Everything runs where the weights are; inputs built on the host (positions, biases, indices,
  // padding masks) follow them. On a CPU model every .to(dev) below is a no-op.
  const at::Device dev = embed_.device();
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  const at::Tensor tok = in.tokens_BL.to(dev);
  const at::Tensor valid_BL = in.valid_BL.defined() ? in.valid_BL.to(dev) : at::Tensor();
  const int64_t B = tok.size(0), L = tok.size(1);
  // Layout indices: a forward follows the cached positions, or (cache_at) stands in for some of
  // them; the keys are the cache's positions and then this forward's.
  const int64_t cached = in.cache ? in.cache->length() : 0;
  const bool replace = in.cache && in.cache_at >= 0;
  TORCH_CHECK(!replace || in.cache_at + L <= cached, "[", kind_, "] tokens at ", in.cache_at,
              "..", in.cache_at + L, " beyond the cache of ", cached, " positions");
  TORCH_CHECK(!(replace && in.cache_append), "[", kind_,
              "] a forward in place of cached positions cannot append to the cache");
  const int64_t first = replace ? in.cache_at : cached;
  const int64_t n_keys = replace ? cached : cached + L;
  at::Tensor pos = in.positions_L.defined() ? in.positions_L.to(dev) : at::Tensor();
  if (!pos.defined() && first > 0) pos = torch::arange(first, first + L, lopt);
  TORCH_CHECK(!pos.defined() || pos.size(-1) == L, "[", kind_, "] ", pos.size(-1),
              " positions for ", L, " tokens");
  const int64_t last_pos = L == 0 ? 0 : pos.defined() ? pos.max().item<int64_t>() : L - 1;
  TORCH_CHECK(last_pos < o_.max_seq_len, "[", kind_, "] position ", last_pos,
              " exceeds model.max_seq_len = ", o_.max_seq_len);
  // The rotary tables are plain members built on the host (not buffers: they are not saved):
  // moved once to the weights' device and kept there until the model moves again.
  if (rope_.cos_LH.device() != dev) {
    rope_.cos_LH = rope_.cos_LH.to(dev);
    rope_.sin_LH = rope_.sin_LH.to(dev);
  }
  auto x = embed_.index_select(0, tok.reshape({-1})).view({B, L, o_.d_model});  // [B, L, D]
  const at::Tensor q_idx = torch::arange(first, first + L, lopt);
  const at::Tensor k_idx = torch::arange(n_keys, lopt);
  at::Tensor bias;
  if (in.attn_bias.defined()) {
    bias = in.attn_bias.to(dev);
  } else if (o_.attention == "block_causal") {
    bias = first == 0 && !replace && in.block_origin == 0
               ? block_causal_bias(L, o_.block_size).to(dev)
               : block_causal_bias(q_idx - in.block_origin, k_idx - in.block_origin, o_.block_size);
  } else if (o_.attention == "causal") {  // an autoregressive model: blocks of one token
    bias = first == 0 && !replace ? block_causal_bias(L, 1).to(dev)
                                  : block_causal_bias(q_idx, k_idx, 1);
  }
  // Padding keys are hidden from every query but their own (a query that sees no key at all would
  // turn into NaN and leak through the values).
  const bool pad = valid_BL.defined() || (in.cache && in.cache->valid_BK.defined());
  at::Tensor kv_valid;
  if (pad) {
    const auto bopt = torch::TensorOptions().dtype(torch::kBool).device(dev);
    auto cur = valid_BL.defined() ? valid_BL : torch::ones({B, L}, bopt);
    auto past = cached == 0 ? at::Tensor()
                : in.cache->valid_BK.defined() ? in.cache->valid_BK.to(dev)
                                               : torch::ones({B, cached}, bopt);
    if (replace) {
      kv_valid = torch::cat({past.narrow(1, 0, first), cur,
                             past.narrow(1, first + L, cached - first - L)}, 1);
    } else {
      kv_valid = past.defined() ? torch::cat({past, cur}, 1) : cur;  // [B, Lk]
    }
    auto self = k_idx.unsqueeze(0) == q_idx.unsqueeze(1);           // [L, Lk]
    auto ok = kv_valid.unsqueeze(1) | self.unsqueeze(0);            // [B, L, Lk]
    auto kb = torch::zeros(ok.sizes(), torch::TensorOptions().dtype(torch::kFloat32).device(dev))
                  .masked_fill(ok.logical_not(), -std::numeric_limits<float>::infinity());
    kb = kb.unsqueeze(1);                                           // [B, 1, L, Lk]
    bias = bias.defined() ? bias + kb : kb;
  }
  RoutingContext ctx;
  if (!moe_.empty()) {
    auto masked = tok == mask_id();
    if (valid_BL.defined()) masked = masked & valid_BL;
    // The [MASK] fraction of each row: over its real positions, and for BD3's [x_t ; x_0] over
    // the noisy half only.
    const int64_t n_ratio = in.noisy_len > 0 ? std::min(in.noisy_len, L) : L;
    auto m_part = masked.narrow(1, 0, n_ratio).to(torch::kFloat32);
    if (valid_BL.defined()) {
      ctx.mask_ratio_B = m_part.sum(1) /
                         valid_BL.narrow(1, 0, n_ratio).to(torch::kFloat32).sum(1).clamp_min(1.0);
      ctx.valid_T = valid_BL.reshape({-1});
    } else {
      ctx.mask_ratio_B = m_part.mean(1);
    }
    ctx.is_masked_T = masked.reshape({-1});
    if (in.domain_BL.defined() && in.domain_BL.size(0) == B) {
      // BD3's [x_t ; x_0] rows hold each token twice: the clean half has the same domains.
      const int64_t Ld = in.domain_BL.size(1);
      if (Ld == L) ctx.domain_T = in.domain_BL.reshape({-1});
      if (2 * Ld == L) ctx.domain_T = in.domain_BL.repeat({1, 2}).reshape({-1});
    }
    ctx.seq_T = torch::arange(B, lopt).repeat_interleave(L);
    ctx.n_seq = B;
    ctx.step = in.step;
    ctx.micro = in.micro;
    if (routing_block_ > 0) {
      // Routing blocks on the same grid as attention blocks and the samplers' decoding blocks:
      // floor((i - block_origin) / R) of the layout index i. Ids are shifted to be >= 0 and are
      // the same in every forward of a generation (a block's id does not depend on which part of
      // the sequence a cached forward runs), so policies can remember a block between forwards.
      const int64_t R = routing_block_;
      const int64_t shift = (std::max<int64_t>(in.block_origin, 0) + R - 1) / R + 1;
      const int64_t span = std::max<int64_t>(o_.max_seq_len, first + L);
      const int64_t per_seq = (span + R - 1) / R + shift + 1;
      auto chunk = (q_idx - in.block_origin).div(R, "floor") + shift;  // [L], >= 0
      ctx.block_T = (torch::arange(B, lopt).unsqueeze(1) * per_seq + chunk.unsqueeze(0))
                        .reshape({-1});
    }
  }
  if (in.cache && in.cache->layers.size() != blocks_.size()) in.cache->layers.resize(blocks_.size());
  // Regions are recomputed wherever a graph is built (training; the memory plan's probe runs in
  // eval mode with grad, where routing changes no state).
  const bool graph = at::GradMode::is_enabled() && !in.cache;
  if (block_hook_) block_hook_(-1);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (i > 0 && block_hook_) block_hook_(static_cast<int64_t>(i) - 1);
    ctx.layer = static_cast<int64_t>(i);
    if (graph && ac_.whole_block(static_cast<int64_t>(i))) {
      // Recomputed in the backward (nn/checkpoint.h), after this forward has returned: the
      // region holds what it reads by value.
      auto block = blocks_[i];
      const RotaryTables rope = rope_;
      const bool has_ctx = !moe_.empty();
      const RoutingContext c = ctx;
      x = checkpoint(
          [block, rope, bias, pos, has_ctx, c](const std::vector<at::Tensor>& v)
              -> std::vector<at::Tensor> {
            return {block->forward(v[0], rope, bias, has_ctx ? &c : nullptr, pos)};
          },
          {x})[0];
      continue;
    }
    x = blocks_[i]->forward(x, rope_, bias, moe_.empty() ? nullptr : &ctx, pos,
                            in.cache ? &in.cache->layers[i] : nullptr, in.cache_append,
                            replace ? first : -1);
  }
  if (block_hook_ && !blocks_.empty()) block_hook_(static_cast<int64_t>(blocks_.size()) - 1);
  if (in.cache && in.cache_append && pad) in.cache->valid_BK = kv_valid;
  profile::Scope sc("output_head");
  x = norm_->forward(x);
  if (in.logits_index_M.defined()) {
    x = x.reshape({B * L, o_.d_model}).index_select(0, in.logits_index_M.to(dev));  // [M, D]
  }
  const at::Tensor w = head_.defined() ? head_ : embed_.narrow(0, 0, o_.vocab_size);
  return {torch::nn::functional::linear(x, w)};
}

std::string TransformerDlm::describe() const {
  const std::string ffn =
      moe_.empty() ? str("d_ff ", o_.d_ff)
                   : str("blocks ", pattern_, " (D: SwiGLU d_ff ", o_.d_ff, "; M: MoE ",
                         moe_.front()->describe(), ")");
  return str(kind_, ": ", o_.n_layer, " layers, d_model ", o_.d_model, ", ", o_.n_head,
             " heads (", o_.n_kv_head, " KV), ", ffn, ", vocab ", o_.vocab_size,
             " + [MASK], ", o_.attention, " attention",
             o_.attention == "block_causal" ? str(" (block ", o_.block_size, ")") : "",
             o_.tie_embeddings ? ", tied head" : ", untied head");
}

namespace {

/// Real experts per token that layer `i` is counted with: the measured value when given, else
/// the router's plan, else its top-K; never more than the layer's experts.
double counted_experts(const MoeLayer& m, size_t i, const std::vector<double>& measured) {
  double k = i < measured.size() ? measured[i] : m.router().planned_experts_per_token();
  if (std::isnan(k)) k = static_cast<double>(m.router().top_k());
  return std::min(k, static_cast<double>(m.options().n_expert));
}

}  // namespace

bool TransformerDlm::experts_per_token_data_dependent() const {
  for (const MoeLayer* m : moe_) {
    if (std::isnan(m->router().planned_experts_per_token())) return true;
  }
  return false;
}

int64_t TransformerDlm::num_active_parameters(const std::vector<double>& k_measured) const {
  // Routed experts count as used k times per routed layer (capped by the pool), everything else
  // once. Pools shared by several layers are counted once in the total.
  std::set<const ExpertPool*> pools;
  double routed_total = 0, routed_active = 0;
  for (size_t i = 0; i < moe_.size(); ++i) {
    const MoeLayer* m = moe_[i];
    const auto& mo = m->options();
    const double per_expert = 3.0 * static_cast<double>(mo.d_model * mo.d_expert);
    if (pools.insert(&m->pool()).second) {
      routed_total += static_cast<double>(m->pool().global_n_expert()) * per_expert;
    }
    routed_active += counted_experts(*m, i, k_measured) * per_expert;
  }
  return num_parameters() - static_cast<int64_t>(routed_total) +
         std::llround(std::min(routed_active, routed_total));
}

double TransformerDlm::train_flops_per_token(int64_t L, const std::vector<double>& k_measured) const {
  const double D = static_cast<double>(o_.d_model), hd = static_cast<double>(o_.head_dim);
  const double H = static_cast<double>(o_.n_head), Hk = static_cast<double>(o_.n_kv_head);
  const double attn = (H + 2 * Hk) * hd * D + D * H * hd;  // wqkv + wo
  double matmul = static_cast<double>(o_.vocab_size) * D;   // output head
  for (size_t i = 0; i < blocks_.size(); ++i) {
    matmul += attn;
    if (pattern_[i] == 'D') matmul += 3 * D * static_cast<double>(o_.d_ff);
  }
  for (size_t i = 0; i < moe_.size(); ++i) {  // every routed layer call (CoE: every iteration)
    const MoeLayer* l = moe_[i];
    const auto& mo = l->options();
    const double k = counted_experts(*l, i, k_measured);
    matmul += 3 * D * (k * static_cast<double>(mo.d_expert) + static_cast<double>(mo.d_shared)) +
              static_cast<double>(mo.n_expert) * D;  // router
  }
  const double attention = 12.0 * static_cast<double>(o_.n_layer) * static_cast<double>(L) * H * hd;
  return 6.0 * matmul + attention;
}

}  // namespace mixdiff
