#include "moe/moe_layer.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/errors.h"
#include "core/profile.h"
#include "moe/block_routing.h"
#include "moe/dispatcher.h"
#include "moe/observers.h"

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

// ---------------------------------------------------------------------------------------------

MoeLayer::MoeLayer(const MoeOptions& o, std::shared_ptr<RouterBase> router, LayerExperts experts)
    : o_(o), ex_(std::move(experts)) {
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
        d0, ctx.block_T, block_, std::max<int64_t>(iteration_, 0), ctx.step, ctx.valid_T});
  }
  RoutingDecision d;
  {
    profile::Scope sc("routing");
    d = router_->route(x, ctx);
  }
  at::Tensor tok = d.token_A, ex = d.expert_A, gate = d.gate_A;
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
  }
  if (!observers_.empty()) {
    const RoutedForward f{*this, d, ctx, tok, ex, gate, routed, updates_state(*this, ctx)};
    for (const auto& o : observers_) o->on_forward(f);
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

void MoeLayer::add_observer(std::shared_ptr<RoutingObserver> o) {
  observers_.push_back(std::move(o));
}

void MoeLayer::remove_observer(const RoutingObserver* o) {
  observers_.erase(std::remove_if(observers_.begin(), observers_.end(),
                                  [o](const auto& p) { return p.get() == o; }),
                   observers_.end());
}

}  // namespace mixdiff
