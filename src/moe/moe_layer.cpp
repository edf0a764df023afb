#include "moe/moe_layer.h"

#include <torch/torch.h>

#include <algorithm>

#include "core/errors.h"
#include "core/profile.h"
#include "moe/block_routing.h"
#include "moe/dispatcher.h"
#include "moe/observers.h"
#include "nn/checkpoint.h"

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
  o.shared_gate = c.get<bool>("shared_gate", false);
  if (o.shared_gate && o.n_shared == 0) c.fail("shared_gate", "needs shared experts (n_shared > 0)");
  if (o.d_shared < 0 || (o.n_shared > 0 && o.d_shared == 0)) {
    c.fail("d_shared", "expected a positive width when n_shared > 0");
  }
  const double capacity_factor = c.get<double>("capacity_factor", 0.0);
  if (!(capacity_factor >= 0)) c.fail("capacity_factor", "expected >= 0 (0: dropless)");
  const auto drop = c.get_choice<DropPolicy>(
      "drop_policy", {{"probability", DropPolicy::kProbability}, {"position", DropPolicy::kPosition}},
      DropPolicy::kProbability);
  if (capacity_factor > 0) o.capacity = std::make_shared<ExpertCapacity>(capacity_factor, drop);
  o.dispatcher = create_named(dispatchers_registry(), c, "dispatch", "sorted", c);
  o.stat_buckets = c.get<int64_t>("stat_buckets", 4);
  if (o.stat_buckets <= 0) c.fail("stat_buckets", "expected a positive integer");
  o.stat_segment = c.get<int64_t>("stat_segment", 32);
  if (o.stat_segment <= 0) c.fail("stat_segment", "expected a positive segment length in tokens");
  o.stat_cache = c.get<double>("stat_cache", 2.0);
  if (!(o.stat_cache >= 1)) {
    c.fail("stat_cache", "expected a cache size of at least 1 (x the experts per token)");
  }
  return o;
}

// ---------------------------------------------------------------------------------------------

MoeLayer::MoeLayer(const MoeOptions& o, std::shared_ptr<RouterBase> router,
                   std::shared_ptr<SlotMap> slots)
    : o_(o), slots_(slots ? std::move(slots) : std::make_shared<SlotMap>()) {
  if (!o_.dispatcher) o_.dispatcher = make_dispatcher("sorted");
  router_ = register_module("router", std::move(router));
  if (!slots_->pool()) {
    pool_ = register_module("experts", std::make_shared<ExpertPool>(o.n_expert, o.d_model,
                                                                     o.d_expert));
  } else {
    pool_ = slots_->pool();  // registered once by its owner
    const at::Tensor& cand_S = slots_->candidates();
    TORCH_CHECK(!cand_S.defined() || cand_S.size(0) == o.n_expert, "[MoeLayer] ",
                cand_S.size(0), " candidates for ", o.n_expert, " slots");
    TORCH_CHECK(cand_S.defined() || pool_->n_expert() == o.n_expert,
                "[MoeLayer] a shared pool of ", pool_->n_expert(), " experts needs candidates for ",
                o.n_expert, " slots");
  }
  if (slots_->shared_experts) {
    shared_ = slots_->shared_experts;
  } else if (o.n_shared > 0) {
    shared_ = register_module("shared", std::make_shared<SwiGLU>(o.d_model, o.d_shared));
  }
  if (o.shared_gate) shared_gate_ = register_parameter("shared_gate", torch::empty({1, o.d_model}));
}

std::string MoeLayer::describe() const {
  const std::string extra = slots_->describe();
  return str(o_.n_expert, !slots_->pool() ? " experts x " : str(" slots of a shared pool of ",
                                                                 pool_->n_expert(), " experts x "),
             o_.d_expert,
             o_.n_shared > 0 ? str(" + ", o_.n_shared, o_.shared_gate ? " gated" : "", " shared (",
                                   o_.d_shared, ")")
                             : "",
             extra.empty() ? "" : str(", ", extra), ", ", router_->describe(), ", ",
             o_.capacity ? o_.capacity->describe() : "dropless");
}

void MoeLayer::restrict(const at::Tensor& x_TD, RoutingContext& ctx) {
  const at::Tensor visible_S = slots_->visible(ctx.step, is_training(), x_TD.device());
  if (visible_S.defined()) ctx.visible_S = visible_S;
  if (block_policy_ && block_policy_->restricts() && ctx.block_T.defined()) {
    // Probe the token-level routing (no state changes), let the policy pick each block's coreset,
    // then route inside it.
    RoutingContext probe = ctx;
    probe.probe = true;
    RoutingDecision d0 = router_->route(x_TD, probe);
    ctx.allowed_TS = block_policy_->allowed(BlockRoutingInput{
        d0, ctx.block_T, block_, std::max<int64_t>(iteration(), 0), ctx.step, ctx.valid_T});
  }
}

at::Tensor MoeLayer::forward(const at::Tensor& x_BLD, const RoutingContext* ctx_in) {
  const int64_t D = x_BLD.size(-1);
  const int64_t T = x_BLD.numel() / D;
  RoutingContext ctx = ctx_in ? *ctx_in : RoutingContext{};
  auto x_TD = x_BLD.reshape({T, D});
  // A recomputation (nn/checkpoint.h) replays what the first forward decided: the restricted
  // slots, the router's selection (checked) and the capacity drops (no new draw, no collective).
  const bool recompute = recompute_pass() == RecomputePass::kRecompute;
  std::vector<at::Tensor> replay;
  if (recompute) {
    replay = replay_next(str("layer ", block_, " MoE"));
    TORCH_CHECK(replay.size() == 5, "[MoeLayer] a replay entry of ", replay.size(), " tensors");
    ctx.visible_S = replay[0];
    ctx.allowed_TS = replay[1];
  } else {
    restrict(x_TD, ctx);
  }
  RoutingDecision d;
  {
    profile::Scope sc("routing");
    d = router_->route(x_TD, ctx);
  }
  Assignments kept{d.token_A, d.expert_A, d.gate_A, {}};
  const int64_t routed = kept.size();
  if (recompute) {
    // The router is deterministic given its input, weights and the (unchanged) balancer state;
    // a kernel that is not would show here rather than silently train on another routing.
    TORCH_CHECK(torch::equal(d.token_A, replay[2]) && torch::equal(d.expert_A, replay[3]),
                "[MoeLayer] block ", block_, ": the recomputed routing differs from the first "
                "forward's (a nondeterministic kernel?); set train.activation_checkpointing: none");
    const at::Tensor& keep = replay[4];
    if (keep.defined()) {
      kept = {d.token_A.index_select(0, keep), d.expert_A.index_select(0, keep),
              d.gate_A.index_select(0, keep), keep};
    }
  } else if (o_.capacity) {
    const double real = ctx.valid_T.defined() ? ctx.valid_T.sum().item<double>()
                                              : static_cast<double>(T);
    // Training forwards share the bound over the global batch; an evaluation forward is a batch
    // of its own, as in one process.
    kept = o_.capacity->apply(kept, o_.n_expert, d.top_k, real, T,
                              is_training() ? scope_ : RankScope{});
  }
  if (recompute_pass() == RecomputePass::kFirst) {
    replay_record({ctx.visible_S, ctx.allowed_TS, d.token_A, d.expert_A, kept.index_A});
  }
  const at::Tensor pool_expert_A = slots_->pool_experts(kept.slot_A);
  auto y_TD = pool_->forward(x_TD, kept.token_A, pool_expert_A, kept.gate_A, *o_.dispatcher);
  if (shared_) {
    at::Tensor s = shared_->forward(x_TD, nullptr);
    if (shared_gate_.defined()) {
      s = s * torch::sigmoid(torch::nn::functional::linear(x_TD, shared_gate_.to(x_TD.scalar_type())));
    }
    y_TD = y_TD + s;
  }
  profile::Scope stats_scope("routing_stats_and_aux");
  // A training forward counts the global-batch statistics once (a checkpointed region: in its
  // first forward) and attaches the routing losses where the graph is built (a checkpointed
  // region: in its recomputation, which reads the same statistics).
  const bool updates = updates_state(*this, ctx);
  if (updates) count_global(d, ctx, T);
  if ((updates && at::GradMode::is_enabled()) || (recompute && is_training())) {
    y_TD = attach_losses(d, ctx, y_TD);
  }
  if (!observers_.empty() && !recompute) {
    const RoutedForward f{*this, d, ctx, kept.token_A, kept.slot_A, kept.gate_A, routed, updates};
    for (const auto& o : observers_) o->on_forward(f);
  }
  return y_TD.view(x_BLD.sizes());
}

void MoeLayer::count_global(const RoutingDecision& d, const RoutingContext& ctx, int64_t T) {
  torch::NoGradGuard ng;
  auto w_T = valid_weights(ctx.valid_T, T, d.probs_TS.device());
  const int64_t S = d.probs_TS.size(1);
  // [counts_S ; prob_sum_S ; tokens]: one reduction over the ranks.
  auto packed = torch::cat({d.lb_map_TS.sum(0), (d.probs_TS * w_T.unsqueeze(1)).sum(0),
                            w_T.sum().reshape({1})});
  if (reduce_) reduce_(packed);
  auto counts_S = packed.narrow(0, 0, S), probs_S = packed.narrow(0, S, S);
  global_.last_counts_S = counts_S.clone();
  global_.counts_S = global_.counts_S.defined() ? global_.counts_S + counts_S : counts_S.clone();
  global_.prob_sum_S =
      global_.prob_sum_S.defined() ? global_.prob_sum_S + probs_S : probs_S.clone();
  global_.last_tokens = packed[2 * S].item<double>();
  global_.tokens += global_.last_tokens;
  global_.micro += 1;
}

at::Tensor MoeLayer::attach_losses(const RoutingDecision& d, const RoutingContext& ctx,
                                   at::Tensor y_TD) {
  if (aux_.empty()) return y_TD;
  RoutingRecord r{d,       ctx, *pool_, global_, slots_->candidates(), slots_->pool_users(),
                  reduce_ ? &reduce_ : nullptr};
  at::Tensor total;
  if (aux_values_.size() != aux_.size()) aux_values_.assign(aux_.size(), 0.0);
  for (size_t i = 0; i < aux_.size(); ++i) {
    auto v = aux_[i].term->layer_loss(r);
    aux_values_[i] += v.item<double>();
    auto wv = v * aux_[i].weight;
    total = total.defined() ? total + wv : wv;
  }
  return attach_aux_loss(y_TD, total, aux_scale_);
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
