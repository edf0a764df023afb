#include "nn/layers.h"
#include "nn/checkpoint.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "core/compat.h"
#include "core/profile.h"
#include "nn/fused_kernels.h"

namespace mixdiff {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool fusable(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }

struct RMSNormFn : public torch::autograd::Function<RMSNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    auto xc = x.contiguous();
    const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
    auto y = at::empty_like(xc);
    auto rstd = at::empty({rows}, xc.options());
    auto wc = w.contiguous();
    kernels::rmsnorm_forward(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(),
                             rstd.data_ptr<float>(), rows, d, static_cast<float>(eps));
    ctx->save_for_backward({xc, wc, rstd});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& rstd = saved[2];
    auto dy = grads[0].contiguous();
    const int64_t d = x.size(-1), rows = rstd.size(0);
    auto dx = at::empty_like(x);
    auto dw = at::zeros_like(w);
    kernels::rmsnorm_backward(dy.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(),
                              rstd.data_ptr<float>(), dx.data_ptr<float>(), dw.data_ptr<float>(),
                              rows, d);
    return {dx, dw, at::Tensor()};
  }
};

/// x [B, L, H, hd] rotated with per-position tables cos, sin [L, hd].
struct RotaryFn : public torch::autograd::Function<RotaryFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    auto xc = x.contiguous(), c = cos.contiguous(), s = sin.contiguous();
    auto y = at::empty_like(xc);
    kernels::rotary(xc.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(),
                    y.data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.size(3), false);
    ctx->save_for_backward({c, s});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto dy = grads[0].contiguous();
    auto dx = at::empty_like(dy);
    kernels::rotary(dy.data_ptr<float>(), saved[0].data_ptr<float>(), saved[1].data_ptr<float>(),
                    dx.data_ptr<float>(), dy.size(0), dy.size(1), dy.size(2), dy.size(3), true);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

RMSNorm::RMSNorm(int64_t dim, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", torch::ones({dim}));
}

at::Tensor RMSNorm::forward(const at::Tensor& x) const {
  if (fusable(x) && fusable(weight_)) return RMSNormFn::apply(x, weight_, eps_);
  return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps_) * weight_;
}

RotaryTables RotaryTables::make(int64_t max_len, int64_t head_dim, double theta) {
  TORCH_CHECK(head_dim % 2 == 0, "[RotaryTables] head_dim must be even, got ", head_dim);
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto inv_freq = 1.0 / torch::pow(theta, torch::arange(0, head_dim, 2, opts) / head_dim);
  auto angles = torch::outer(torch::arange(max_len, opts), inv_freq);  // [L, hd/2]
  auto cos = angles.cos(), sin = angles.sin();
  RotaryTables t;
  t.cos_LH = torch::cat({cos, cos}, -1).to(torch::kFloat32);
  // rotate_half(x) = [-x2, x1]; folding the sign into sin lets apply_rotary use one cat.
  t.sin_LH = torch::cat({-sin, sin}, -1).to(torch::kFloat32);
  return t;
}

at::Tensor apply_rotary(const at::Tensor& x, const RotaryTables& rope, const at::Tensor& pos) {
  return apply_rotary_BLHd(x.transpose(1, 2), rope, pos).transpose(1, 2);
}

at::Tensor apply_rotary_BLHd(const at::Tensor& x, const RotaryTables& rope, const at::Tensor& pos) {
  const int64_t L = x.size(1), half = x.size(3) / 2;
  at::Tensor cos, sin;
  if (pos.defined() && pos.dim() == 2) {
    // One row of positions per sequence (left-padded decoding): composite form, [B, L, 1, hd].
    TORCH_CHECK(pos.size(0) == x.size(0) && pos.size(1) == L, "[apply_rotary] positions ",
                pos.sizes(), " for tokens ", x.sizes());
    TORCH_CHECK(L == 0 || pos.max().item<int64_t>() < rope.cos_LH.size(0),
                "[apply_rotary] position ", pos.max().item<int64_t>(),
                " beyond the rotary table (model.max_seq_len = ", rope.cos_LH.size(0), ")");
    const auto at_table = pos.reshape({-1}).to(rope.cos_LH.device());
    const int64_t hd = rope.cos_LH.size(1);
    cos = rope.cos_LH.index_select(0, at_table).view({x.size(0), L, 1, hd}).to(x.device());
    sin = rope.sin_LH.index_select(0, at_table).view({x.size(0), L, 1, hd}).to(x.device());
    auto swapped = torch::cat({x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
    return x * cos + swapped * sin;
  }
  if (pos.defined()) {
    TORCH_CHECK(pos.size(0) == L, "[apply_rotary] ", pos.size(0), " positions for ", L, " tokens");
    TORCH_CHECK(L == 0 || pos.max().item<int64_t>() < rope.cos_LH.size(0),
                "[apply_rotary] position ", pos.max().item<int64_t>(),
                " beyond the rotary table (model.max_seq_len = ", rope.cos_LH.size(0), ")");
    // The tables are host-built members (not buffers): index where they live, then follow x.
    const auto at_table = pos.to(rope.cos_LH.device());
    cos = rope.cos_LH.index_select(0, at_table).to(x.device());
    sin = rope.sin_LH.index_select(0, at_table).to(x.device());
  } else {
    TORCH_CHECK(L <= rope.cos_LH.size(0), "[apply_rotary] sequence of ", L,
                " tokens exceeds the rotary table (model.max_seq_len = ", rope.cos_LH.size(0), ")");
    cos = rope.cos_LH.narrow(0, 0, L).to(x.device());
    sin = rope.sin_LH.narrow(0, 0, L).to(x.device());
  }
  if (fusable(x) && fusable(cos)) return RotaryFn::apply(x, cos, sin);
  cos = cos.unsqueeze(1);  // [L, 1, hd], broadcast over heads
  sin = sin.unsqueeze(1);
  auto swapped = torch::cat({x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + swapped * sin;
}

at::Tensor block_causal_bias(int64_t L, int64_t block_size) {
  TORCH_CHECK(block_size > 0, "[block_causal_bias] block_size must be positive");
  auto blk = torch::arange(L, torch::kLong).div(block_size, "floor");
  auto allowed = blk.unsqueeze(0) <= blk.unsqueeze(1);  // [Lq, Lk]: key block <= query block
  return torch::zeros({L, L}).masked_fill(allowed.logical_not(),
                                          -std::numeric_limits<float>::infinity());
}

at::Tensor block_causal_bias(const at::Tensor& q_pos, const at::Tensor& k_pos, int64_t block_size) {
  TORCH_CHECK(block_size > 0, "[block_causal_bias] block_size must be positive");
  auto qb = q_pos.div(block_size, "floor"), kb = k_pos.to(q_pos.device()).div(block_size, "floor");
  auto allowed = kb.unsqueeze(0) <= qb.unsqueeze(1);
  return torch::zeros({q_pos.size(0), k_pos.size(0)}, q_pos.options().dtype(torch::kFloat32))
      .masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
}

at::Tensor bd3_training_bias(int64_t L, int64_t block_size) {
  TORCH_CHECK(block_size > 0, "[bd3_training_bias] block_size must be positive");
  auto idx = torch::arange(2 * L, torch::kLong);
  auto clean = idx >= L;                                    // second half: x_0
  auto blk = (idx - clean.to(torch::kLong) * L).div(block_size, "floor");
  auto qc = clean.unsqueeze(1), kc = clean.unsqueeze(0);
  auto qb = blk.unsqueeze(1), kb = blk.unsqueeze(0);
  auto same_block_noisy = qc.logical_not() & kc.logical_not() & (qb == kb);
  auto noisy_to_earlier_clean = qc.logical_not() & kc & (kb < qb);
  auto clean_causal = qc & kc & (kb <= qb);
  auto allowed = same_block_noisy | noisy_to_earlier_clean | clean_causal;
  return torch::zeros({2 * L, 2 * L})
      .masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
}

Attention::Attention(const AttentionOptions& o) : o_(o) {
  TORCH_CHECK(o.n_head > 0 && o.n_kv_head > 0 && o.n_head % o.n_kv_head == 0,
              "[Attention] n_kv_head (", o.n_kv_head, ") must divide n_head (", o.n_head, ")");
  wqkv_ = register_parameter("wqkv", torch::empty({(o.n_head + 2 * o.n_kv_head) * o.head_dim,
                                                   o.d_model}));
  wo_ = register_parameter("wo", torch::empty({o.d_model, o.n_head * o.head_dim}));
  if (o.qkv_bias) {
    bqkv_ = register_parameter("bqkv", torch::zeros({(o.n_head + 2 * o.n_kv_head) * o.head_dim}));
  }
  if (o.qk_norm) {
    const int64_t qd = o.qk_norm_projection ? o.n_head * o.head_dim : o.head_dim;
    const int64_t kd = o.qk_norm_projection ? o.n_kv_head * o.head_dim : o.head_dim;
    q_norm_ = register_module("q_norm", std::make_shared<RMSNorm>(qd, o.norm_eps));
    k_norm_ = register_module("k_norm", std::make_shared<RMSNorm>(kd, o.norm_eps));
  }
}

at::Tensor Attention::forward(const at::Tensor& x, const RotaryTables& rope,
                              const at::Tensor& bias, const at::Tensor& pos, LayerKV* kv,
                              bool append, int64_t at) {
  const int64_t B = x.size(0), L = x.size(1), H = o_.n_head, Hk = o_.n_kv_head, hd = o_.head_dim;
  auto qkv = torch::nn::functional::linear(x, wqkv_, bqkv_);  // [B, L, (H + 2Hk) hd]
  auto q = qkv.narrow(-1, 0, H * hd);
  auto k = qkv.narrow(-1, H * hd, Hk * hd);
  if (q_norm_ && o_.qk_norm_projection) {
    q = q_norm_->forward(q);
    k = k_norm_->forward(k);
  }
  q = q.reshape({B, L, H, hd});
  k = k.reshape({B, L, Hk, hd});
  auto v = qkv.narrow(-1, (H + Hk) * hd, Hk * hd).view({B, L, Hk, hd}).transpose(1, 2);
  if (q_norm_ && !o_.qk_norm_projection) {
    q = q_norm_->forward(q);
    k = k_norm_->forward(k);
  }
  q = apply_rotary_BLHd(q, rope, pos).transpose(1, 2);  // [B, H, L, hd]
  k = apply_rotary_BLHd(k, rope, pos).transpose(1, 2);
  if (kv && kv->k.defined() && at >= 0) {  // this forward's keys in place of cached ones
    const int64_t Lc = kv->k.size(2);
    TORCH_CHECK(at + L <= Lc, "[Attention] tokens at ", at, "..", at + L,
                " beyond the cache of ", Lc);
    k = torch::cat({kv->k.narrow(2, 0, at), k, kv->k.narrow(2, at + L, Lc - at - L)}, 2);
    v = torch::cat({kv->v.narrow(2, 0, at), v, kv->v.narrow(2, at + L, Lc - at - L)}, 2);
  } else if (kv && kv->k.defined()) {  // cached keys first, then this forward's
    k = torch::cat({kv->k, k}, 2);
    v = torch::cat({kv->v, v}, 2);
  }
  TORCH_CHECK(!(append && at >= 0), "[Attention] a forward in place of cached keys cannot append");
  if (kv && append) {
    kv->k = k;
    kv->v = v;
  }
  const int64_t Lk = k.size(2);
  if (Hk != H) {  // grouped-query attention: each KV head serves H / Hk query heads
    k = k.unsqueeze(2).expand({B, Hk, H / Hk, Lk, hd}).reshape({B, H, Lk, hd});
    v = v.unsqueeze(2).expand({B, Hk, H / Hk, Lk, hd}).reshape({B, H, Lk, hd});
  }
  auto o = compat::attention(q, k, v, bias);                    // [B, H, L, hd]
  o = o.transpose(1, 2).reshape({B, L, H * hd});                // [B, L, H hd]
  return torch::nn::functional::linear(o, wo_);
}

SwiGLU::SwiGLU(int64_t d_model, int64_t d_ff) {
  w_gate_ = register_parameter("w_gate", torch::empty({d_ff, d_model}));
  w_up_ = register_parameter("w_up", torch::empty({d_ff, d_model}));
  w_down_ = register_parameter("w_down", torch::empty({d_model, d_ff}));
}

at::Tensor SwiGLU::forward(const at::Tensor& x, const RoutingContext*) {
  profile::Scope sc("dense_ffn");
  namespace F = torch::nn::functional;
  return F::linear(F::silu(F::linear(x, w_gate_)) * F::linear(x, w_up_), w_down_);
}

TransformerBlock::TransformerBlock(const AttentionOptions& a, std::shared_ptr<FeedForward> ffn) {
  attn_norm_ = register_module("attn_norm", std::make_shared<RMSNorm>(a.d_model, a.norm_eps));
  attn_ = register_module("attn", std::make_shared<Attention>(a));
  ffn_norm_ = register_module("ffn_norm", std::make_shared<RMSNorm>(a.d_model, a.norm_eps));
  ffn_ = register_module("ffn", std::move(ffn));
}

at::Tensor TransformerBlock::forward(const at::Tensor& x, const RotaryTables& rope,
                                     const at::Tensor& bias, const RoutingContext* ctx,
                                     const at::Tensor& pos, LayerKV* kv, bool append,
                                     int64_t at) {
  at::Tensor a;
  {
    profile::Scope sc("attention");
    a = attn_->forward(attn_norm_->forward(x), rope, bias, pos, kv, append, at);
  }
  auto h = x + a;
  if (checkpoint_ffn_ && at::GradMode::is_enabled()) {
    // The region runs again in the backward, after this call has returned: it holds the modules
    // and the routing context by value.
    auto ffn = ffn_;
    auto norm = ffn_norm_;
    const bool has_ctx = ctx != nullptr;
    const RoutingContext c = has_ctx ? *ctx : RoutingContext{};
    return checkpoint(
        [ffn, norm, has_ctx, c](const std::vector<at::Tensor>& in) -> std::vector<at::Tensor> {
          return {ffn->residual(in[0], norm->forward(in[0]), has_ctx ? &c : nullptr)};
        },
        {h})[0];
  }
  return ffn_->residual(h, ffn_norm_->forward(h), ctx);
}

void init_transformer_weights(torch::nn::Module& m, double std, int64_t n_layer) {
  torch::NoGradGuard ng;
  const double scaled = std / std::sqrt(2.0 * static_cast<double>(n_layer));
  for (auto& kv : m.named_parameters(/*recurse=*/true)) {
    const std::string& name = kv.key();
    at::Tensor& p = kv.value();
    auto ends_with = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    if (p.dim() < 2) {
      if (ends_with(".bqkv")) {
        p.zero_();  // biases start at zero, norm weights at one
      } else {
        p.fill_(1.0);
      }
    } else {
      // Residual-branch output projections are scaled down as in GPT-2 so that the residual
      // stream's variance does not grow with depth.
      p.normal_(0.0, ends_with(".wo") || ends_with(".w_down") ? scaled : std);
    }
  }
}

}  // namespace mixdiff
