#include "moe/moe_layer.h"

#include <torch/torch.h>

#include <cmath>

#include "core/errors.h"
#include "core/profile.h"
#include "moe/block_routing.h"
#include "moe/dispatcher.h"

namespace mixdiff {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AuxLossScaler : public torch::autograd::Function<AuxLossScaler> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& act, const at::Tensor& aux,
                            double scale) {
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["aux_options"] = c10::IValue(aux.scalar_type() == at::kDouble);
    ctx->saved_data["aux_device"] = c10::IValue(aux.device());
    return act;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool dbl = ctx->saved_data["aux_options"].toBool();
    const at::Device dev = ctx->saved_data["aux_device"].toDevice();
    const auto dtype = dbl ? torch::kFloat64 : torch::kFloat32;
    auto g = torch::full({}, scale, torch::TensorOptions().dtype(dtype).device(dev));
    return {grads[0], g, at::Tensor()};
  }
};

}  // namespace

std::pair<double, int64_t> unique_experts_per_block(const at::Tensor& block_T,
                                                    const at::Tensor& token_A,
                                                    const at::Tensor& expert_A, int64_t n_expert,
                                                    const at::Tensor& valid_T) {
  torch::NoGradGuard ng;
  auto blocks = valid_T.defined() ? block_T.masked_select(valid_T) : block_T;
  const int64_t n_blocks = std::get<0>(at::_unique(blocks)).size(0);
  if (expert_A.numel() == 0) return {0.0, n_blocks};
  auto pairs = block_T.index_select(0, token_A) * n_expert + expert_A;
  return {static_cast<double>(std::get<0>(at::_unique(pairs)).size(0)), n_blocks};
}

at::Tensor attach_aux_loss(const at::Tensor& act, const at::Tensor& aux, double scale) {
  return AuxLossScaler::apply(act, aux, scale);
}

MoeOptions MoeOptions::from(const ConfigNode& c, int64_t d_model) {
  MoeOptions o;
  o.d_model = d_model;
  o.n_expert = c.get<int64_t>("n_expert");
  if (o.n_expert <= 0) c.fail("n_expert", str("expected a positive integer, got ", o.n_expert));
  o.d_expert = c.get<int64_t>("d_expert");
  if (o.d_expert <= 0) c.fail("d_expert", str("expected a positive integer, got ", o.d_expert));
  o.n_shared = c.get<int64_t>("n_shared", 0);
  if (o.n_shared < 0) c.fail("n_shared", "expected >= 0");
  o.d_shared = c.get<int64_t>("d_shared", o.n_shared * o.d_expert);
  if (o.d_shared < 0 || (o.n_shared > 0 && o.d_shared == 0)) {
    c.fail("d_shared", "expected a positive width when n_shared > 0");
  }
  o.capacity_factor = c.get<double>("capacity_factor", 0.0);
  if (!(o.capacity_factor >= 0)) c.fail("capacity_factor", "expected >= 0 (0: dropless)");
  o.drop_policy = c.get_choice<DropPolicy>(
      "drop_policy", {{"probability", DropPolicy::kProbability}, {"position", DropPolicy::kPosition}},
      DropPolicy::kProbability);
  const std::string dispatch = c.get<std::string>("dispatch", "sorted");
  if (!dispatchers_registry().contains(dispatch)) {
    std::string known;
    for (const auto& n : dispatchers_registry().names()) known += (known.empty() ? "" : ", ") + n;
    c.fail("dispatch", "unknown dispatcher '" + dispatch + "' (known: " + known + ")");
  }
  o.dispatcher = dispatchers_registry().create(dispatch, c.path() + ".dispatch", c);
  o.stat_buckets = c.get<int64_t>("stat_buckets", 4);
  if (o.stat_buckets <= 0) c.fail("stat_buckets", "expected a positive integer");
  return o;
}

at::Tensor real_token_mean(const at::Tensor& v_T, const RoutingContext& ctx) {
  auto w = valid_weights(ctx.valid_T, v_T.size(0), v_T.device());
  return (v_T * w).sum() / w.sum().clamp_min(1.0);
}

// ---------------------------------------------------------------------------------------------

at::Tensor VisibilitySchedule::at(int64_t step, bool training) const {
  at::Tensor v = fixed_S;
  if (order_S.defined() && training) {
    const int64_t S = order_S.size(0);
    const double frac = ramp_steps > 0 ? std::min(1.0, static_cast<double>(step) /
                                                           static_cast<double>(ramp_steps))
                                       : 1.0;
    const auto n = std::min<int64_t>(
        S, start + static_cast<int64_t>(std::llround(static_cast<double>(S - start) * frac)));
    if (n < S) {
      auto prog = torch::zeros({S}, order_S.options().dtype(torch::kBool));
      prog.index_fill_(0, order_S.narrow(0, 0, n), true);
      v = v.defined() ? (v.to(prog.device()) & prog) : prog;
    }
  }
  return v;
}

void GlobalLoad::reset() {
  counts_S = at::Tensor();
  last_counts_S = at::Tensor();
  prob_sum_S = at::Tensor();
  last_tokens = 0;
  tokens = 0;
  micro = 0;
}

double GlobalLoad::value() const {
  if (!counts_S.defined() || tokens <= 0) return 0.0;
  const double total = counts_S.sum().item<double>();
  if (total <= 0) return 0.0;
  const auto S = static_cast<double>(counts_S.size(0));
  return S * ((counts_S / total) * (prob_sum_S / tokens)).sum().item<double>();
}

// ---------------------------------------------------------------------------------------------

RoutingStats::RoutingStats(int64_t n_expert, int64_t buckets)
    : n_expert_(n_expert), buckets_(buckets) {
  reset();
}

void RoutingStats::reset() {
  counts_E_ = torch::zeros({n_expert_}, torch::kFloat64);
  bucket_counts_NE_ = torch::zeros({buckets_, n_expert_}, torch::kFloat64);
  bucket_tokens_N_ = torch::zeros({buckets_}, torch::kFloat64);
  per_token_hist_ = torch::zeros({9}, torch::kFloat64);
  tokens_ = entropy_sum_ = routed_ = kept_ = zero_gate_ = 0;
}

void RoutingStats::add(const RoutingDecision& d, const at::Tensor& kept_token_A,
                       const at::Tensor& kept_expert_A, const at::Tensor& kept_gate_A,
                       int64_t routed, const RoutingContext& ctx) {
  torch::NoGradGuard ng;
  const int64_t T = d.probs_TS.size(0);
  auto w = valid_weights(ctx.valid_T, T, d.probs_TS.device());
  const double tokens = w.sum().item<double>();
  tokens_ += tokens;
  routed_ += static_cast<double>(routed);
  kept_ += static_cast<double>(kept_expert_A.numel());
  auto ex = kept_expert_A.to(torch::kCPU);
  const auto tok = kept_token_A.to(torch::kCPU);
  const auto w64 = w.to(torch::kCPU, torch::kFloat64);
  counts_E_ += torch::bincount(ex, {}, n_expert_).to(torch::kFloat64);
  auto per_tok = torch::bincount(tok, {}, T).clamp_max(8);
  per_token_hist_ += torch::bincount(per_tok, w64, 9);
  auto gate_sum_T = torch::zeros({T}, torch::kFloat64)
                        .index_add_(0, tok, kept_gate_A.detach().abs().to(torch::kCPU, torch::kFloat64));
  zero_gate_ += ((per_tok > 0) & (gate_sum_T == 0)).to(torch::kFloat64).mul(w64).sum().item<double>();
  auto p = d.probs_TS.detach();
  auto ent = -(p * p.clamp_min(1e-30).log()).sum(1);
  entropy_sum_ += (ent * w.to(ent.device())).sum().item<double>();
  if (ctx.mask_ratio_B.defined() && ctx.seq_T.defined()) {
    auto r = ctx.mask_ratio_B.to(torch::kCPU).to(torch::kFloat64);
    auto b_B = (r * static_cast<double>(buckets_)).floor().clamp(0, buckets_ - 1).to(torch::kLong);
    auto b_T = b_B.index_select(0, ctx.seq_T.to(torch::kCPU));
    bucket_tokens_N_.index_add_(0, b_T, w64);
    auto b_A = b_T.index_select(0, tok);
    auto flat = bucket_counts_NE_.view({-1});
    flat.index_add_(0, b_A * n_expert_ + ex, torch::ones({ex.numel()}, torch::kFloat64));
  }
}

void RoutingStats::reduce(const StatReducer& r) {
  if (!r) return;
  auto scalars = torch::tensor({tokens_, entropy_sum_, routed_, kept_, zero_gate_}, torch::kFloat64);
  auto packed = torch::cat({counts_E_, bucket_counts_NE_.reshape({-1}), bucket_tokens_N_,
                            per_token_hist_, scalars});
  r(packed);
  int64_t off = 0;
  auto take = [&](at::Tensor& t) {
    t.copy_(packed.narrow(0, off, t.numel()).view_as(t));
    off += t.numel();
  };
  take(counts_E_);
  take(bucket_counts_NE_);
  take(bucket_tokens_N_);
  take(per_token_hist_);
  take(scalars);
  tokens_ = scalars[0].item<double>();
  entropy_sum_ = scalars[1].item<double>();
  routed_ = scalars[2].item<double>();
  kept_ = scalars[3].item<double>();
  zero_gate_ = scalars[4].item<double>();
}

namespace {

nlohmann::json load_summary(const at::Tensor& counts) {
  std::vector<double> c(counts.data_ptr<double>(), counts.data_ptr<double>() + counts.numel());
  nlohmann::json j;
  j["tokens_per_expert"] = c;
  const double mean = counts.mean().item<double>();
  if (mean > 0) {
    j["max_mean"] = counts.max().item<double>() / mean;
    j["cv"] = counts.std(/*unbiased=*/false).item<double>() / mean;
  } else {
    j["max_mean"] = nullptr;
    j["cv"] = nullptr;
  }
  j["dead"] = (counts == 0).sum().item<int64_t>();
  return j;
}

}  // namespace

nlohmann::json RoutingStats::to_json() const {
  nlohmann::json j = load_summary(counts_E_);
  j["tokens"] = tokens_;
  j["entropy"] = tokens_ > 0 ? entropy_sum_ / tokens_ : 0.0;
  j["dropped"] = routed_ > 0 ? 1.0 - kept_ / routed_ : 0.0;
  j["experts_per_token"] = tokens_ > 0 ? kept_ / tokens_ : 0.0;
  j["experts_per_token_hist"] = std::vector<double>(
      per_token_hist_.data_ptr<double>(), per_token_hist_.data_ptr<double>() + 9);
  j["unrouted"] = tokens_ > 0 ? per_token_hist_[0].item<double>() / tokens_ : 0.0;
  j["zero_gate"] = tokens_ > 0 ? zero_gate_ / tokens_ : 0.0;
  nlohmann::json buckets = nlohmann::json::array();
  for (int64_t b = 0; b < buckets_; ++b) {
    const double lo = static_cast<double>(b) / static_cast<double>(buckets_);
    const double hi = static_cast<double>(b + 1) / static_cast<double>(buckets_);
    nlohmann::json e = load_summary(bucket_counts_NE_[b].contiguous());
    e["mask_ratio"] = {lo, hi};
    e["tokens"] = bucket_tokens_N_[b].item<double>();
    buckets.push_back(e);
  }
  j["by_mask_ratio"] = buckets;
  return j;
}

// ---------------------------------------------------------------------------------------------

MoeLayer::MoeLayer(const MoeOptions& o, std::shared_ptr<RouterBase> router, LayerExperts experts)
    : o_(o), ex_(std::move(experts)), stats_(o.n_expert, o.stat_buckets) {
  if (!o_.dispatcher) o_.dispatcher = make_dispatcher("sorted");
  router_ = register_module("router", std::move(router));
  owns_pool_ = !ex_.pool;
  if (owns_pool_) {
    pool_ = register_module("experts", std::make_shared<ExpertPool>(o.n_expert, o.d_model,
                                                                     o.d_expert));
  } else {
    pool_ = ex_.pool;  // registered once by its owner
    TORCH_CHECK(!ex_.candidates_S.defined() || ex_.candidates_S.size(0) == o.n_expert,
                "[MoeLayer] ", ex_.candidates_S.size(0), " candidates for ", o.n_expert, " slots");
    TORCH_CHECK(ex_.candidates_S.defined() || pool_->n_expert() == o.n_expert,
                "[MoeLayer] a shared pool of ", pool_->n_expert(), " experts needs candidates for ",
                o.n_expert, " slots");
  }
  if (ex_.shared) {
    shared_ = ex_.shared;
  } else if (o.n_shared > 0) {
    shared_ = register_module("shared", std::make_shared<SwiGLU>(o.d_model, o.d_shared));
  }
}

std::string MoeLayer::describe() const {
  return str(o_.n_expert, owns_pool_ ? " experts x " : str(" slots of a shared pool of ",
                                                            pool_->n_expert(), " experts x "),
             o_.d_expert,
             o_.n_shared > 0 ? str(" + ", o_.n_shared, " shared (", o_.d_shared, ")") : "",
             ", ", router_->describe(),
             o_.capacity_factor > 0
                 ? str(", capacity ", format_double(o_.capacity_factor), " (drop by ",
                       o_.drop_policy == DropPolicy::kProbability ? "probability" : "position",
                       ")")
                 : ", dropless");
}

at::Tensor MoeLayer::capacity_keep(const at::Tensor& expert_A, const at::Tensor& priority_A,
                                   int64_t n_expert, int64_t capacity) {
  const int64_t A = expert_A.size(0);
  if (A == 0) return {};
  auto o1 = std::get<1>(priority_A.sort(/*stable=*/true, 0, /*descending=*/false));
  auto o2 = std::get<1>(expert_A.index_select(0, o1).sort(/*stable=*/true, 0, false));
  auto order = o1.index_select(0, o2);  // by expert, then by priority
  auto counts = torch::bincount(expert_A, {}, n_expert);
  auto starts = counts.cumsum(0) - counts;
  auto rank = torch::arange(A, expert_A.options().dtype(torch::kLong)) -
              starts.index_select(0, expert_A.index_select(0, order));
  auto keep = rank < capacity;
  if (keep.all().item<bool>()) return {};
  return std::get<0>(order.masked_select(keep).sort());
}

at::Tensor MoeLayer::forward(const at::Tensor& x_BLD, const RoutingContext* ctx_in) {
  const int64_t D = x_BLD.size(-1);
  const int64_t T = x_BLD.numel() / D;
  RoutingContext ctx = ctx_in ? *ctx_in : RoutingContext{};
  auto x = x_BLD.reshape({T, D});
  // The candidate map and the visibility masks are host-built members (not buffers, so not in
  // model.safetensors): they follow the activations' device, moved once per device change.
  if (ex_.candidates_S.defined() && ex_.candidates_S.device() != x.device()) {
    ex_.candidates_S = ex_.candidates_S.to(x.device());
  }
  if (ex_.visibility.fixed_S.defined() && ex_.visibility.fixed_S.device() != x.device()) {
    ex_.visibility.fixed_S = ex_.visibility.fixed_S.to(x.device());
  }
  if (ex_.visibility.order_S.defined() && ex_.visibility.order_S.device() != x.device()) {
    ex_.visibility.order_S = ex_.visibility.order_S.to(x.device());
  }
  if (ex_.visibility.active()) {
    ctx.visible_S = ex_.visibility.at(ctx.step, is_training());
    if (ctx.visible_S.defined()) ctx.visible_S = ctx.visible_S.to(x.device());
  }
  if (block_policy_ && block_policy_->restricts() && ctx.block_T.defined()) {
    // Probe the token-level routing (no state changes), let the policy pick each block's coreset,
    // then route inside it.
    RoutingContext probe = ctx;
    probe.probe = true;
    RoutingDecision d0 = router_->route(x, probe);
    ctx.allowed_TS = block_policy_->allowed(BlockRoutingInput{
        d0, ctx.block_T, block_ * 16 + std::max<int64_t>(iteration_, 0), ctx.step, ctx.valid_T});
  }
  RoutingDecision d;
  {
    profile::Scope sc("routing");
    d = router_->route(x, ctx);
  }
  at::Tensor tok = d.token_A, ex = d.expert_A, gate = d.gate_A;
  if (keep_last_) last_ = d;
  const int64_t routed = tok.numel();
  if (o_.capacity_factor > 0) {
    const double real = ctx.valid_T.defined() ? ctx.valid_T.sum().item<double>()
                                              : static_cast<double>(T);
    const auto cap = static_cast<int64_t>(std::ceil(
        o_.capacity_factor * real * static_cast<double>(d.top_k) / static_cast<double>(o_.n_expert)));
    auto priority = o_.drop_policy == DropPolicy::kProbability ? -gate.detach()
                                                                 : tok.to(torch::kFloat64);
    auto keep = capacity_keep(ex, priority, o_.n_expert, cap);
    if (keep.defined()) {
      tok = tok.index_select(0, keep);
      ex = ex.index_select(0, keep);
      gate = gate.index_select(0, keep);
    }
  }
  if (count_unique_ && ctx.block_T.defined()) {
    auto [sum, blocks] = unique_experts_per_block(ctx.block_T, tok, ex, o_.n_expert, ctx.valid_T);
    unique_.sum += sum;
    unique_.blocks += blocks;
  }
  const auto pool_ex = ex_.candidates_S.defined() ? ex_.candidates_S.index_select(0, ex) : ex;
  auto y = pool_->forward(x, tok, pool_ex, gate, *o_.dispatcher);
  if (shared_) y = y + shared_->forward(x, nullptr);
  profile::Scope stats_scope("routing_stats_and_aux");

  if (updates_state(*this, ctx)) {
    {
      torch::NoGradGuard ng;
      auto w = valid_weights(ctx.valid_T, T, d.probs_TS.device());
      const int64_t S = d.probs_TS.size(1);
      auto packed = torch::cat({d.lb_map_TS.sum(0), (d.probs_TS * w.unsqueeze(1)).sum(0),
                                w.sum().reshape({1})});
      if (reduce_) reduce_(packed);
      auto counts = packed.narrow(0, 0, S), probs = packed.narrow(0, S, S);
      global_.last_counts_S = counts.clone();
      global_.counts_S = global_.counts_S.defined() ? global_.counts_S + counts : counts.clone();
      global_.prob_sum_S = global_.prob_sum_S.defined() ? global_.prob_sum_S + probs : probs.clone();
      global_.last_tokens = packed[2 * S].item<double>();
      global_.tokens += global_.last_tokens;
      global_.micro += 1;
    }
    if (!aux_.empty()) {
      RoutingRecord r{d,      ctx, *pool_, global_, ex_.candidates_S, ex_.pool_users,
                      reduce_ ? &reduce_ : nullptr};
      at::Tensor total;
      if (aux_values_.size() != aux_.size()) aux_values_.assign(aux_.size(), 0.0);
      for (size_t i = 0; i < aux_.size(); ++i) {
        auto v = aux_[i].term->layer_loss(r);
        aux_values_[i] += v.item<double>();
        auto wv = v * aux_[i].weight;
        total = total.defined() ? total + wv : wv;
      }
      y = attach_aux_loss(y, total, aux_scale_);
    }
    stats_.add(d, tok, ex, gate, routed, ctx);
  }
  return y.view(x_BLD.sizes());
}

std::vector<double> MoeLayer::take_aux_values() {
  std::vector<double> v = aux_values_;
  if (v.size() != aux_.size()) v.assign(aux_.size(), 0.0);
  aux_values_.assign(aux_.size(), 0.0);
  return v;
}

void MoeLayer::step_end(const StatReducer& reduce) {
  router_->step_end(reduce);
  if (global_.micro > 0) last_global_lbl_ = global_.value();
  global_.reset();
}

nlohmann::json MoeLayer::take_stats(const StatReducer& reduce) {
  stats_.reduce(reduce);
  if (stats_.empty()) return nullptr;
  nlohmann::json j = stats_.to_json();
  j["global_lbl"] = last_global_lbl_;
  if (iteration_ >= 0) j["iteration"] = iteration_;
  stats_.reset();
  return j;
}

}  // namespace mixdiff
