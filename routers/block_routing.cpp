// Block routing policies (src/moe/block_routing.h; algorithms.md section 10):
//   token      no restriction (the baseline)
//   dmoe       dMoE (arXiv 2605.30876): the scores of every token's top-K experts are summed over
//              the block and normalised; the coreset is the smallest prefix of experts (by that
//              share) whose cumulative share exceeds `p` (the crossing expert included); if it has
//              fewer than `guard` experts, the top-`guard` instead (dMoE: p 0.6, guard 16 at
//              inference, 12 in training)
//   des_vote   DES-Vote (arXiv 2602.00879, RECONSTRUCTED): tokens vote with their gate weights;
//              the coreset is the `budget` most voted experts
//   des_seq    DES-Seq (NOT FOUND, proposed): the union over the block of every token's top-`k_prime`
//              experts
//   admission  LLaDA2.2-style admission: the `capacity` experts with the highest block-max score
//   interval   interval refresh after TIDE (arXiv 2605.20179): at the block's first denoising step
//              and every `tau` steps after it (ModelInput::step is the step inside the block) the
//              coreset becomes the `budget` experts the block's tokens chose most (`vote: count`,
//              TIDE's bincount) or with the most gate weight (`vote: gate`, DES-Vote's tally:
//              with tau 1 the policy is des_vote); in between the block keeps it. Unlike TIDE,
//              which refreshes which experts are resident on the GPU and still computes every
//              routed expert (lossless), this policy restricts routing to the set (lossy).
// Scores: the router's raw scores where they differ from its probabilities (sigmoid, NormRouter),
// else the probabilities. Padding tokens never vote.
#include <torch/torch.h>

#include <limits>
#include <map>
#include <tuple>
#include <utility>

#include "core/errors.h"
#include "moe/block_routing.h"

namespace mixdiff {

namespace {

// Shape suffixes: T tokens, S slots, N the forward's blocks (NB of them).

const at::Tensor& scores_of(const RoutingDecision& d) {
  return d.scores_TS.defined() ? d.scores_TS : d.probs_TS;
}

/// [NB, S] sum over each block's tokens of `v_TS`.
at::Tensor per_block_sum(const at::Tensor& v_TS, const at::Tensor& inv, int64_t NB) {
  return torch::zeros({NB, v_TS.size(1)}, v_TS.options()).index_add(0, inv, v_TS);
}

/// [T, S] scores at each token's chosen slots, 0 elsewhere.
at::Tensor chosen_scores(const RoutingDecision& d, int64_t S) {
  const auto& s_TS = scores_of(d);
  auto out_TS = torch::zeros({s_TS.size(0), S}, s_TS.options());
  if (d.token_A.numel() == 0) return out_TS;
  return out_TS.index_put({d.token_A, d.expert_A}, s_TS.index({d.token_A, d.expert_A}));
}

/// `v_TS` with the rows of padding tokens set to `fill`.
at::Tensor real_rows(const at::Tensor& v_TS, const at::Tensor& valid_T, double fill) {
  if (!valid_T.defined()) return v_TS;
  return v_TS.masked_fill(valid_T.to(v_TS.device()).logical_not().unsqueeze(1), fill);
}

/// bool [NB, S] marking the top-`n` of each row of `v`.
at::Tensor top_mask(const at::Tensor& v, int64_t n) {
  n = std::min<int64_t>(n, v.size(1));
  return torch::zeros(v.sizes(), v.options().dtype(torch::kBool))
      .scatter_(1, topk_indices(v, n), true);
}

class TokenLevel : public BlockRoutingPolicy {
 public:
  at::Tensor allowed(const BlockRoutingInput&) override { return {}; }
  bool restricts() const override { return false; }
  std::string describe() const override { return "token-level routing"; }
};

class Dmoe : public BlockRoutingPolicy {
 public:
  explicit Dmoe(const ConfigNode& c) {
    p_ = c.get<double>("p", 0.6);
    if (!(p_ > 0 && p_ <= 1)) c.fail("p", "expected a share in (0, 1]");
    guard_ = c.get<int64_t>("guard", 16);
    if (guard_ < 1) c.fail("guard", "expected at least 1 expert");
  }
  at::Tensor allowed(const BlockRoutingInput& in) override {
    const auto& d = in.token_level;
    const int64_t S = d.n_expert;
    auto [ids_N, inv_T] = block_index(in.block_T);
    const int64_t NB = ids_N.size(0);
    auto v_NS = per_block_sum(chosen_scores(d, S).detach(), inv_T, NB);
    v_NS = v_NS / (v_NS.sum(-1, true) + 1e-20);
    auto sorted = v_NS.sort(/*stable=*/true, -1, /*descending=*/true);
    auto sv_NS = std::get<0>(sorted), si_NS = std::get<1>(sorted);
    auto before_NS = sv_NS.cumsum(-1) - sv_NS;
    auto keep_NS = before_NS < p_;  // up to and including the expert that crosses p
    keep_NS.select(1, 0).fill_(true);
    auto core_NS =
        torch::zeros({NB, S}, si_NS.options().dtype(torch::kBool)).scatter_(1, si_NS, keep_NS);
    auto small_N = core_NS.sum(-1) < std::min(guard_, S);
    if (small_N.any().item<bool>()) {
      core_NS = torch::where(small_N.unsqueeze(1), top_mask(v_NS, guard_), core_NS);
    }
    return core_NS.index_select(0, inv_T);
  }
  std::string describe() const override {
    return str("dmoe (p ", format_double(p_), ", guard ", guard_, ")");
  }

 private:
  double p_ = 0.6;
  int64_t guard_ = 16;
};

class DesVote : public BlockRoutingPolicy {
 public:
  explicit DesVote(const ConfigNode& c) : budget_(c.get<int64_t>("budget", 16)) {
    if (budget_ < 1) c.fail("budget", "expected at least 1 expert");
  }
  at::Tensor allowed(const BlockRoutingInput& in) override {
    const auto& d = in.token_level;
    const int64_t S = d.n_expert;
    auto [ids_N, inv_T] = block_index(in.block_T);
    auto w_TS =
        torch::zeros({scores_of(d).size(0), S}, scores_of(d).options().dtype(torch::kFloat32));
    if (d.token_A.numel() > 0) {
      w_TS.index_put_({d.token_A, d.expert_A}, d.gate_A.detach().to(torch::kFloat32));
    }
    auto votes_NS = per_block_sum(w_TS, inv_T, ids_N.size(0));
    return top_mask(votes_NS, budget_).index_select(0, inv_T);
  }
  std::string describe() const override { return str("des_vote (budget ", budget_, ")"); }

 private:
  int64_t budget_;
};

class DesSeq : public BlockRoutingPolicy {
 public:
  explicit DesSeq(const ConfigNode& c) : k_prime_(c.get<int64_t>("k_prime", 2)) {
    if (k_prime_ < 1) c.fail("k_prime", "expected at least 1");
  }
  at::Tensor allowed(const BlockRoutingInput& in) override {
    const auto& d = in.token_level;
    const int64_t S = d.n_expert;
    auto [ids_N, inv_T] = block_index(in.block_T);
    auto s_TS = real_rows(scores_of(d).detach().narrow(1, 0, S), in.valid_T, 0.0);
    auto mine_TS = real_rows(torch::zeros({s_TS.size(0), S}, s_TS.options().dtype(torch::kFloat32))
                                 .scatter_(1, topk_indices(s_TS, std::min(k_prime_, S)), 1.0),
                             in.valid_T, 0.0);
    auto core_NS = per_block_sum(mine_TS, inv_T, ids_N.size(0)) > 0;
    // Each token still needs K experts inside the union: fill up from the block's best.
    const int64_t K = std::min(d.top_k, S);
    auto small_N = core_NS.sum(-1) < K;
    if (small_N.any().item<bool>()) {
      auto best_NS = top_mask(per_block_sum(s_TS, inv_T, ids_N.size(0)), K);
      core_NS = torch::where(small_N.unsqueeze(1), core_NS | best_NS, core_NS);
    }
    return core_NS.index_select(0, inv_T);
  }
  std::string describe() const override { return str("des_seq (k' ", k_prime_, ")"); }

 private:
  int64_t k_prime_;
};

class Admission : public BlockRoutingPolicy {
 public:
  explicit Admission(const ConfigNode& c) : capacity_(c.get<int64_t>("capacity", 16)) {
    if (capacity_ < 1) c.fail("capacity", "expected at least 1 expert");
  }
  at::Tensor allowed(const BlockRoutingInput& in) override {
    const auto& d = in.token_level;
    const int64_t S = d.n_expert;
    auto [ids_N, inv_T] = block_index(in.block_T);
    const int64_t NB = ids_N.size(0);
    auto s_TS = real_rows(scores_of(d).detach().narrow(1, 0, S), in.valid_T,
                          -std::numeric_limits<double>::infinity())
                    .contiguous();
    auto mx_NS = torch::full({NB, S}, -std::numeric_limits<float>::infinity(),
                             s_TS.options().dtype(torch::kFloat32));
    mx_NS = mx_NS.index_reduce(0, inv_T, s_TS, "amax", /*include_self=*/true);
    return top_mask(mx_NS, capacity_).index_select(0, inv_T);
  }
  std::string describe() const override { return str("admission (capacity ", capacity_, ")"); }

 private:
  int64_t capacity_;
};

class Interval : public BlockRoutingPolicy {
 public:
  explicit Interval(const ConfigNode& c)
      : tau_(c.get<int64_t>("tau", 4)),
        budget_(c.get<int64_t>("budget", 16)),
        vote_(c.get_choice<Vote>("vote", {{"count", Vote::kCount}, {"gate", Vote::kGate}},
                                  Vote::kCount)) {
    if (tau_ < 1) c.fail("tau", "expected at least 1 step");
    if (budget_ < 1) c.fail("budget", "expected at least 1 expert");
  }
  at::Tensor allowed(const BlockRoutingInput& in) override {
    const auto& d = in.token_level;
    const int64_t S = d.n_expert;
    auto [ids_N, inv_T] = block_index(in.block_T);
    const int64_t NB = ids_N.size(0);
    auto votes_TS =
        torch::zeros({scores_of(d).size(0), S}, scores_of(d).options().dtype(torch::kFloat32));
    if (d.token_A.numel() > 0) {
      votes_TS.index_put_({d.token_A, d.expert_A},
                          vote_ == Vote::kGate ? d.gate_A.detach().to(torch::kFloat32)
                                          : torch::ones({d.token_A.size(0)}, votes_TS.options()));
    }
    auto fresh_NS = top_mask(per_block_sum(votes_TS, inv_T, NB), budget_);
    auto core_NS = torch::empty({NB, S}, fresh_NS.options());
    for (int64_t b = 0; b < NB; ++b) {
      const auto key = std::make_tuple(in.layer, in.iteration, ids_N[b].item<int64_t>());
      auto it = memory_.find(key);
      if (it == memory_.end() || in.step % tau_ == 0) {
        memory_[key] = fresh_NS[b].clone();
        core_NS[b].copy_(fresh_NS[b]);
      } else {
        core_NS[b].copy_(it->second);
      }
    }
    return core_NS.index_select(0, inv_T);
  }
  void reset() override { memory_.clear(); }
  std::string describe() const override {
    return str("interval (tau ", tau_, ", budget ", budget_, ", vote ",
               vote_ == Vote::kGate ? "gate" : "count", ")");
  }

 private:
  enum class Vote { kCount, kGate };  ///< count: TIDE's token counts; gate: DES-Vote's gate sums
  int64_t tau_, budget_;
  Vote vote_;
  std::map<std::tuple<int64_t, int64_t, int64_t>, at::Tensor> memory_;  ///< (layer, iteration, block)
};

template <class T>
std::shared_ptr<BlockRoutingPolicy> make(const ConfigNode& c) {
  return std::make_shared<T>(c);
}

MIXDIFF_REGISTER(block_routing_registry(), "token", "token-level routing (no restriction)",
                 [](const ConfigNode&) -> std::shared_ptr<BlockRoutingPolicy> {
                   return std::make_shared<TokenLevel>();
                 });
MIXDIFF_REGISTER(block_routing_registry(), "dmoe",
                 "dMoE coreset: top-p of the block's summed top-K scores; keys: p (0.6), guard (16)",
                 make<Dmoe>);
MIXDIFF_REGISTER(block_routing_registry(), "des_vote",
                 "DES-Vote: the `budget` experts with most gate-weighted votes; key: budget (16)",
                 make<DesVote>);
MIXDIFF_REGISTER(block_routing_registry(), "des_seq",
                 "DES-Seq: union of every token's top-k' experts; key: k_prime (2)", make<DesSeq>);
MIXDIFF_REGISTER(block_routing_registry(), "admission",
                 "admission of the top-C experts by block-max score; key: capacity (16)",
                 make<Admission>);
MIXDIFF_REGISTER(block_routing_registry(), "interval",
                 "interval refresh after TIDE: the budget most chosen experts of the block, "
                 "kept for tau denoising steps (lossy: routing is restricted to them); keys: "
                 "tau (4), budget (16), vote count|gate",
                 make<Interval>);

}  // namespace
}  // namespace mixdiff
