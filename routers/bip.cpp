// bip: BIP-based balancing (Sun, arXiv 2502.15451; algorithms.md 8.2 and 8.3). The balanced
// top-K assignment of n tokens to m slots with capacity cap = ceil(K n / m) is a linear program
// whose dual prices q_j (one per slot, >= 0) make "each token takes the top-K of s_ij - q_j" the
// optimal assignment. Per training forward, with the scores s of the batch's real tokens:
//   repeat `iters` times:
//     p_i = relu((K+1)-th largest over slots of (s_ij - q_j))
//     q_j = relu((cap+1)-th largest over tokens of (s_ij - p_i))
// then the batch routes by top-K of s - q; gates stay the unbiased scores. q is a buffer
// (`dual`) kept across steps, so the sweeps start warm and evaluation/generation route with the
// last training batch's prices. Under data parallelism the ranks' scores are gathered and every
// rank solves the global batch (W ranks route as one process with the W-times batch; Megatron
// instead averages per-rank quantile-balancing duals, which differs from the global solution).
// RECONSTRUCTED: the paper's Algorithm 1 was not retrievable; this
// is the dual coordinate descent its LP implies and Megatron's quantile_balancing (one sweep);
// iters default 2 (NOT FOUND in the paper).
#include <torch/torch.h>

#include <cmath>

#include "core/errors.h"
#include "moe/router.h"

namespace mixdiff {
namespace {

/// k-th largest along `dim` (k >= 1); zeros when the dimension has fewer than k entries.
at::Tensor kth_largest(const at::Tensor& x, int64_t k, int64_t dim) {
  if (k > x.size(dim)) {
    auto sizes = x.sizes().vec();
    sizes.erase(sizes.begin() + dim);
    return torch::zeros(sizes, x.options());
  }
  return std::get<0>(x.topk(k, dim, /*largest=*/true, /*sorted=*/true)).select(dim, k - 1);
}

class BipBalancer : public Balancer {
 public:
  BipBalancer(const ConfigNode& c, int64_t n_slots) {
    iters_ = c.get<int64_t>("iters", 2);
    if (iters_ <= 0) c.fail("iters", "expected a positive number of dual sweeps");
    dual_ = register_buffer("dual", torch::zeros({n_slots}, torch::kFloat32));
  }

  at::Tensor offset(const at::Tensor& scores, int64_t k, const at::Tensor& valid_T,
                    bool update) override {
    if (update) {
      torch::NoGradGuard ng;
      at::Tensor s_TS = scores, valid = valid_T;
      if (gather_) {  // data parallelism: the global batch's scores, on every rank
        s_TS = gather_(s_TS.to(torch::kFloat32).contiguous());
        const auto v_T = valid.defined() ? valid.to(s_TS.device(), torch::kFloat32)
                                         : torch::ones({scores.size(0)}, s_TS.options());
        valid = gather_(v_T.contiguous()) > 0.5;
      }
      if (valid.defined()) s_TS = s_TS.index_select(0, valid.nonzero().squeeze(1));
      const int64_t n = s_TS.size(0), m = s_TS.size(1);
      if (n > 0) {
        const auto cap = static_cast<int64_t>(
            std::ceil(static_cast<double>(k) * static_cast<double>(n) / static_cast<double>(m)));
        at::Tensor q_S = dual_.clone();
        for (int64_t it = 0; it < iters_; ++it) {
          auto p_T = kth_largest(s_TS - q_S.unsqueeze(0), k + 1, 1).clamp_min(0);  // [n]
          q_S = kth_largest(s_TS - p_T.unsqueeze(1), cap + 1, 0).clamp_min(0);     // [m]
        }
        dual_.copy_(q_S);
      }
    }
    return -dual_;
  }

  std::string describe() const override { return str("BIP dual balancing (", iters_, " sweeps)"); }

 private:
  int64_t iters_ = 2;
  at::Tensor dual_;
};

MIXDIFF_REGISTER(balancers_registry(), "bip",
                 "BIP balancing (Sun 2025): per-batch dual prices q, route by top-K of s - q; "
                 "keys: iters (2)",
                 [](const ConfigNode& c, int64_t s) -> std::shared_ptr<Balancer> {
                   return std::make_shared<BipBalancer>(c, s);
                 });

}  // namespace
}  // namespace mixdiff
