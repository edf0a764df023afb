// erc: expert-router coupling loss (Lv et al., "Coupling Experts and Routers in Mixture-of-Experts
// via an Auxiliary Loss", arXiv 2512.23447; algorithms.md section 7), per MoE layer with n experts,
// router rows R_i (d) and expert gate projections W_g^j (F x d):
//   eps_i  = ||R_i - R_nearest(i)|| / (2 ||R_i||)                          (no gradient)
//   R~_i   = R_i * delta_i,  delta_i ~ U(1 - eps_i, 1 + eps_i)^d           (proxy tokens)
//   M[i,j] = || W_g^j R~_i ||_2                                            (n x n)
//   L      = 1/n^2 sum_{i != j} relu(M[i,j] - alpha M[i,i]) + relu(M[i,j] - alpha M[j,j])
// Constraint 1 (relu(M[i,j] - alpha M[j,j])): expert j answers its own proxy more than others;
// constraint 2 (relu(M[i,j] - alpha M[i,i])): proxy i excites its own expert most.
// RECONSTRUCTED (no public code): the normalisation 1/n^2 and whether alpha multiplies the
// diagonal are the spec's reconstruction; alpha (default 1.0) and the recipe weight (lambda,
// proposed 1.0) are configurable. The perturbation noise comes from a generator seeded by
// (seed, optimizer step, micro-batch, layer), so a resumed run draws the same noise. Null-expert slots have no
// expert weights and are left out. fp32 throughout.
#include <torch/torch.h>

#include <limits>

#include "core/errors.h"
#include "moe/moe_layer.h"

namespace mixdiff {

/// The hinge of the ERC loss on an activation matrix M [n, n] (exposed for tests).
at::Tensor erc_hinge(const at::Tensor& M, double alpha) {
  const int64_t n = M.size(0);
  auto diag_E = M.diagonal();
  auto l_EE =
      torch::relu(M - alpha * diag_E.unsqueeze(1)) + torch::relu(M - alpha * diag_E.unsqueeze(0));
  auto off_EE = torch::eye(n, M.options()).neg().add(1.0);
  return (l_EE * off_EE).sum() / static_cast<double>(n * n);
}

namespace {

class Erc : public RoutingLoss {
 public:
  explicit Erc(const ConfigNode& c) {
    alpha_ = c.get<double>("alpha", 1.0);
    if (!(alpha_ > 0 && alpha_ <= 1)) c.fail("alpha", str("expected (0, 1], got ", alpha_));
    seed_ = c.get<int64_t>("seed", 0);
  }

  at::Tensor layer_loss(const RoutingRecord& r) override {
    const auto& d = r.decision;
    TORCH_CHECK(d.weight_SD.defined(), "[erc] the router has no embedding rows");
    const int64_t n = d.n_expert;
    auto R_ED = d.weight_SD.narrow(0, 0, n).to(torch::kFloat32);  // [n, d]
    auto Wg_EFD = r.pool.w_gate().to(torch::kFloat32);            // [n, F, d]
    const int64_t F = Wg_EFD.size(1), D = Wg_EFD.size(2);
    at::Tensor delta_ED;
    {
      torch::NoGradGuard ng;
      auto dist_EE = torch::cdist(R_ED.unsqueeze(0), R_ED.unsqueeze(0)).squeeze(0);
      dist_EE.fill_diagonal_(std::numeric_limits<float>::infinity());
      auto eps_E = std::get<0>(dist_EE.min(1)) / (2 * R_ED.norm(2, 1).clamp_min(1e-12));
      auto gen = at::make_generator<at::CPUGeneratorImpl>(
          static_cast<uint64_t>(seed_) * 1000003ULL +
          (static_cast<uint64_t>(r.ctx.step) * 64 + static_cast<uint64_t>(r.ctx.micro)) * 131ULL +
          static_cast<uint64_t>(r.ctx.layer + 1));
      auto u_ED = torch::rand({n, D}, gen).to(R_ED.device());
      delta_ED = 1 + (2 * u_ED - 1) * eps_E.unsqueeze(1);
    }
    auto Rt_ED = R_ED * delta_ED;                                         // [n, d]
    at::Tensor M_EE;
    {  // fp32 also under autocast (which would run this product in bf16)
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      M_EE = torch::matmul(Rt_ED, Wg_EFD.reshape({n * F, D}).t()).view({n, n, F}).norm(2, -1);
    }
    return erc_hinge(M_EE, alpha_);
  }

 private:
  double alpha_ = 1.0;
  int64_t seed_ = 0;
};

MIXDIFF_REGISTER(routing_losses_registry(), "erc",
                 "expert-router coupling loss (ByteDance Seed 2025): hinge on the proxy-token "
                 "activation matrix; keys: alpha (1.0), seed",
                 [](const ConfigNode& c) -> std::shared_ptr<RoutingLoss> {
                   return std::make_shared<Erc>(c);
                 });

}  // namespace
}  // namespace mixdiff
