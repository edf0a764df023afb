// unipool_dlm: UniPool (arXiv 2605.06665; algorithms.md section 2): every MoE block routes into
// ONE pool of M experts (a single copy of the weights, `pool.*` in model.safetensors), each with
// its own router (NormRouter, `norm_router`, is the paper's; any router kind works).
//   model.moe.pool_size      M; default N_L * n_expert (N_L MoE blocks), the vanilla expert budget
//   model.moe.pool_fraction  alternatively M = round(fraction * N_L * n_expert): reduced pools
//                            (the paper matches vanilla with 41.6-66.7% of the expert budget)
//   model.moe.visibility     all (default: every block sees the whole pool); partition (block l
//                            sees the l-th of N_L equal slices: vanilla MoE with the pool's
//                            weights); window (slices of the blocks within `visibility_window`)
// Pair it with the `pool_balance` loss (the pool-level LBL on the previous micro-batch's
// layer-averaged usage; weight 1e-2 in the paper, per-layer LBL 0). Of UniPool-lock (v2), the
// full-pool phase's target-cardinality entropy loss is `pool_cardinality`; the candidate freeze,
// MILP partition and lock that follow it are not implemented.
#include <torch/nn/module.h>
#include <torch/torch.h>

#include <cmath>

#include "core/errors.h"
#include "model/moe_model.h"

namespace mixdiff {
namespace {

/// Slots over the whole pool, of which a fixed slice is visible (visibility partition|window).
class PoolSlice : public SlotMap {
 public:
  PoolSlice(std::shared_ptr<ExpertPool> pool, int64_t users, at::Tensor visible_M)
      : SlotMap(std::move(pool), {}, users), visible_M_(std::move(visible_M)) {}
  at::Tensor visible(int64_t, bool, const c10::Device& device) override {
    return on(visible_M_, device);
  }
  std::string describe() const override {
    return str(visible_M_.sum().item<int64_t>(), " visible");
  }

 private:
  at::Tensor visible_M_;  ///< bool [M]
};

std::shared_ptr<ModelBase> build(const ConfigNode& c) {
  const MoeModelRecipe r(c, "UniPool");
  const ConfigNode& moe = r.moe;
  const int64_t n_moe = r.n_moe;
  MoeOptions mo = r.options;
  const int64_t vanilla = n_moe * mo.n_expert;
  int64_t M = vanilla;
  if (moe.has("pool_size") && moe.has("pool_fraction")) {
    moe.fail("pool_size", "give pool_size or pool_fraction, not both");
  }
  if (moe.has("pool_size")) M = moe.get<int64_t>("pool_size");
  if (moe.has("pool_fraction")) {
    const double f = moe.get<double>("pool_fraction");
    if (!(f > 0)) moe.fail("pool_fraction", "expected a positive fraction");
    M = static_cast<int64_t>(std::llround(f * static_cast<double>(vanilla)));
  }
  const std::string vis = moe.get<std::string>("visibility", "all");
  if (vis != "all" && vis != "partition" && vis != "window") {
    moe.fail("visibility", "expected all, partition or window, got '" + vis + "'");
  }
  const int64_t window = moe.get<int64_t>("visibility_window", 1);
  if (window < 0) moe.fail("visibility_window", "expected >= 0 neighbouring blocks");
  if (vis != "all" && M % n_moe != 0) {
    moe.fail("visibility", str("slices need a pool size divisible by the ", n_moe,
                               " MoE blocks, got ", M));
  }
  if (M <= 0) moe.fail("pool_size", "expected a positive pool size");
  mo.n_expert = M;  // every router chooses among the pool's M experts
  auto pool = std::make_shared<ExpertPool>(M, r.backbone.d_model, mo.d_expert,
                                           /*track_usage=*/true);
  return r.build(
      [&](int64_t l) {
        if (vis == "all") {
          return std::make_shared<MoeLayer>(mo, r.make_router(M),
                                            std::make_shared<SlotMap>(pool, at::Tensor(), n_moe));
        }
        const int64_t per = M / n_moe;
        const int64_t lo = vis == "partition" ? l : std::max<int64_t>(0, l - window);
        const int64_t hi = vis == "partition" ? l : std::min<int64_t>(n_moe - 1, l + window);
        auto visible_M = torch::zeros({M}, torch::kBool);
        visible_M.narrow(0, lo * per, (hi - lo + 1) * per).fill_(true);
        return std::make_shared<MoeLayer>(mo, r.make_router(M),
                                          std::make_shared<PoolSlice>(pool, n_moe, visible_M));
      },
      "unipool_dlm", SharedModules{{"pool", pool}});
}

MIXDIFF_REGISTER(models_registry(), "unipool_dlm",
                 "UniPool: one expert pool shared by every MoE block, a router per block "
                 "(norm_router), reduced pools (pool_fraction), per-block visibility masks",
                 [](const ConfigNode& c) { return build(c); });

}  // namespace
}  // namespace mixdiff
