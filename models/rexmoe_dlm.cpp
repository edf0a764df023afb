// rexmoe_dlm: ReXMoE (arXiv 2510.17483; algorithms.md section 4, RECONSTRUCTED: no code or paper
// body was available). Every MoE block keeps the vanilla count of experts (the expert parameters
// equal vanilla MoE's), but its router may choose among the experts of adjacent blocks too; only
// router rows are added. Choices made here, all configurable:
//   model.moe.sharing: grouped  blocks are cut into groups of `window` consecutive MoE blocks; the
//                               group's experts form one pool (`pools.<g>.*`) and every router of
//                               the group chooses among all of them (r E candidates)
//   model.moe.sharing: sliding  one pool of every block's experts (`pool.*`); block l chooses among
//                               the experts of the MoE blocks l - window .. l + window
//   window 1 (grouped) or 0 (sliding) is vanilla MoE.
// Progressive scaling routing (PSR): with `psr_steps` > 0, a router starts with `psr_start`
// candidates (default its own E experts) and the rest become visible linearly until training
// step psr_steps, in a fixed order: own experts first, then a random permutation of the others
// drawn once from `psr_seed` (the spec's proposal: psr_steps ~20% of training). Outside training
// every candidate is visible. The load-balancing losses count only the visible candidates.
#include <torch/nn/module.h>
#include <torch/torch.h>

#include "core/errors.h"
#include "model/moe_model.h"

namespace mixdiff {
namespace {

/// Slots over a pool's experts that become visible progressively in training (PSR): `start` slots
/// of order_S at step 0, growing linearly to all of them at `ramp_steps`; outside training, all.
class ProgressiveSlots : public SlotMap {
 public:
  ProgressiveSlots(std::shared_ptr<ExpertPool> pool, at::Tensor candidates_S, int64_t users,
                   at::Tensor order_S, int64_t start, int64_t ramp_steps)
      : SlotMap(std::move(pool), std::move(candidates_S), users),
        order_S_(std::move(order_S)),
        start_(start),
        ramp_steps_(ramp_steps) {}

  at::Tensor visible(int64_t step, bool training, const c10::Device& device) override {
    if (!training) return {};
    const int64_t S = order_S_.size(0);
    const double frac =
        ramp_steps_ > 0
            ? std::min(1.0, static_cast<double>(step) / static_cast<double>(ramp_steps_))
            : 1.0;
    const auto n = std::min<int64_t>(
        S, start_ + static_cast<int64_t>(std::llround(static_cast<double>(S - start_) * frac)));
    if (n >= S) return {};
    const at::Tensor& order_S = on(order_S_, device);
    auto visible_S = torch::zeros({S}, order_S.options().dtype(torch::kBool));
    visible_S.index_fill_(0, order_S.narrow(0, 0, n), true);
    return visible_S;
  }
  std::string describe() const override {
    return str("PSR ", start_, " -> ", order_S_.size(0), " slots over ", ramp_steps_, " steps");
  }

 private:
  at::Tensor order_S_;  ///< int64 [S]: slots in the order they become visible
  int64_t start_, ramp_steps_;
};

std::shared_ptr<ModelBase> build(const ConfigNode& c) {
  const MoeModelRecipe r(c, "ReXMoE");
  const ConfigNode& moe = r.moe;
  const int64_t n_moe = r.n_moe;
  const MoeOptions& mo = r.options;
  const int64_t E = mo.n_expert;
  const std::string sharing = moe.get<std::string>("sharing", "grouped");
  if (sharing != "grouped" && sharing != "sliding") {
    moe.fail("sharing", "expected grouped or sliding, got '" + sharing + "'");
  }
  const int64_t window = moe.get<int64_t>("window", sharing == "grouped" ? 2 : 1);
  if (window < (sharing == "grouped" ? 1 : 0)) {
    moe.fail("window", sharing == "grouped" ? "expected a group of at least 1 block"
                                            : "expected >= 0 neighbouring blocks");
  }
  const int64_t psr_steps = moe.get<int64_t>("psr_steps", 0);
  if (psr_steps < 0) moe.fail("psr_steps", "expected >= 0 (0: every candidate from the start)");
  const int64_t psr_start = moe.get<int64_t>("psr_start", E);
  if (psr_start < 1) moe.fail("psr_start", "expected at least one candidate");
  const int64_t psr_seed = moe.get<int64_t>("psr_seed", 0);

  // Pools: grouped -> one per group of `window` MoE blocks; sliding -> one for all.
  SharedModules shared;
  std::vector<std::shared_ptr<ExpertPool>> pools;
  auto pool_list = torch::nn::ModuleList();  // grouped: registered as pools.<g>
  auto group_of = [&](int64_t l) { return sharing == "grouped" ? l / window : 0; };
  const int64_t n_groups = sharing == "grouped" ? (n_moe + window - 1) / window : 1;
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t blocks = sharing == "grouped" ? std::min(window, n_moe - g * window) : n_moe;
    pools.push_back(std::make_shared<ExpertPool>(blocks * E, r.backbone.d_model, mo.d_expert, true));
    if (sharing == "grouped") {
      pool_list->push_back(pools.back());
    } else {
      shared.emplace_back("pool", pools.back());
    }
  }
  if (sharing == "grouped") shared.emplace_back("pools", pool_list.ptr());
  return r.build(
      [&](int64_t l) {
        // Candidates in pool-expert ids, own experts first.
        const int64_t g = group_of(l);
        const int64_t first_block = sharing == "grouped" ? g * window : 0;
        const int64_t lo = sharing == "grouped" ? first_block : std::max<int64_t>(0, l - window);
        const int64_t hi = sharing == "grouped"
                               ? first_block + pools[static_cast<size_t>(g)]->n_expert() / E - 1
                               : std::min<int64_t>(n_moe - 1, l + window);
        std::vector<int64_t> cand;
        for (int64_t e = 0; e < E; ++e) cand.push_back((l - first_block) * E + e);
        std::vector<int64_t> others;
        for (int64_t b = lo; b <= hi; ++b) {
          if (b == l) continue;
          for (int64_t e = 0; e < E; ++e) others.push_back((b - first_block) * E + e);
        }
        const int64_t S = static_cast<int64_t>(cand.size() + others.size());
        const auto& pool = pools[static_cast<size_t>(g)];
        const int64_t users = sharing == "grouped" ? pool->n_expert() / E : n_moe;
        // Router slots follow pool order; the PSR order lists own slots first, then a fixed
        // random permutation of the others.
        std::vector<int64_t> slots_pool(cand);
        slots_pool.insert(slots_pool.end(), others.begin(), others.end());
        std::vector<int64_t> sorted(slots_pool);
        std::sort(sorted.begin(), sorted.end());
        auto candidates_S = torch::tensor(sorted, torch::kLong);
        MoeOptions lo_opts = mo;
        lo_opts.n_expert = S;
        if (psr_steps > 0 && S > psr_start) {
          auto slot_of = [&](int64_t pool_id) {
            return static_cast<int64_t>(std::lower_bound(sorted.begin(), sorted.end(), pool_id) -
                                        sorted.begin());
          };
          std::vector<int64_t> order;
          for (int64_t p : cand) order.push_back(slot_of(p));
          auto gen = at::make_generator<at::CPUGeneratorImpl>(
              static_cast<uint64_t>(psr_seed) * 7919 + static_cast<uint64_t>(l));
          auto perm = torch::randperm(static_cast<int64_t>(others.size()), gen);
          for (int64_t i = 0; i < perm.size(0); ++i) {
            order.push_back(slot_of(others[static_cast<size_t>(perm[i].item<int64_t>())]));
          }
          return std::make_shared<MoeLayer>(
              lo_opts, r.make_router(S),
              std::make_shared<ProgressiveSlots>(pool, candidates_S, users,
                                                 torch::tensor(order, torch::kLong), psr_start,
                                                 psr_steps));
        }
        return std::make_shared<MoeLayer>(lo_opts, r.make_router(S),
                                          std::make_shared<SlotMap>(pool, candidates_S, users));
      },
      "rexmoe_dlm", shared);
}

MIXDIFF_REGISTER(models_registry(), "rexmoe_dlm",
                 "ReXMoE: routers choose among the experts of adjacent MoE blocks (grouped or "
                 "sliding window), progressive scaling routing (psr_steps)",
                 [](const ConfigNode& c) { return build(c); });

}  // namespace
}  // namespace mixdiff
