// coe_dlm: Chain-of-Experts (arXiv 2506.18945; algorithms.md section 3). Each MoE block runs C
// routing iterations over ONE set of experts (and one shared expert), each iteration with its
// own router (router.top_k is K' = K / C, the experts per iteration) and its own routing losses
// and telemetry ("iteration" in metrics.jsonl). Residual topology, `model.moe.residual`:
//   code   (the released code, default): x0 = norm(h); x_c = x_{c-1} + MoE_c(x_{c-1}); out = x_C
//          (the block's input h is dropped; no norm between iterations)
//   paper  x0 = h; x_c = x_{c-1} + MoE_c(norm_c(x_{c-1})), norm_1 the block's FFN norm and one
//          more RMSNorm per later iteration (a clean pre-norm reading of the paper's formula; not
//          in the repository)
//   outer  inner residual off: x0 = norm(h); x_c = MoE_c(x_{c-1}); out = h + x_C (the ablation
//          that performed like plain MoE)
// With C = 1, `paper` and `outer` are exactly the vanilla MoE block; `code` is not (it drops h).
#include <torch/nn/module.h>
#include <torch/torch.h>

#include "core/errors.h"
#include "model/moe_model.h"

namespace mixdiff {
namespace {

/// model.moe.residual (see the header comment).
enum class Residual { kCode, kPaper, kOuter };

class ChainOfExperts : public FeedForward {
 public:
  ChainOfExperts(const MoeOptions& mo, int64_t iterations, Residual residual,
                 const std::function<std::shared_ptr<RouterBase>()>& make_router, double eps)
      : residual_(residual) {
    pool_ = register_module("experts",
                            std::make_shared<ExpertPool>(mo.n_expert, mo.d_model, mo.d_expert));
    if (mo.n_shared > 0) {
      shared_ = register_module("shared", std::make_shared<SwiGLU>(mo.d_model, mo.d_shared));
    }
    auto iters = register_module("iters", torch::nn::ModuleList());
    for (int64_t c = 0; c < iterations; ++c) {
      // Every iteration routes into the block's one pool and shared expert.
      auto slots = std::make_shared<SlotMap>(pool_);
      slots->shared_experts = shared_;
      slots->iteration = c;
      auto l = std::make_shared<MoeLayer>(mo, make_router(), std::move(slots));
      iters_.push_back(l);
      iters->push_back(l);
    }
    if (residual_ == Residual::kPaper) {
      auto norms = register_module("norms", torch::nn::ModuleList());
      for (int64_t c = 1; c < iterations; ++c) {
        norms_.push_back(std::make_shared<RMSNorm>(mo.d_model, eps));
        norms->push_back(norms_.back());
      }
    }
  }

  at::Tensor forward(const at::Tensor& normed, const RoutingContext* ctx) override {
    return residual(torch::zeros_like(normed), normed, ctx);
  }

  at::Tensor residual(const at::Tensor& h, const at::Tensor& normed,
                      const RoutingContext* ctx) override {
    const auto C = iters_.size();
    if (residual_ == Residual::kPaper) {
      at::Tensor x = h;
      for (size_t c = 0; c < C; ++c) {
        x = x + iters_[c]->forward(c == 0 ? normed : norms_[c - 1]->forward(x), ctx);
      }
      return x;
    }
    at::Tensor x = normed;
    for (size_t c = 0; c < C; ++c) {
      x = residual_ == Residual::kCode ? x + iters_[c]->forward(x, ctx)
                                       : iters_[c]->forward(x, ctx);
    }
    return residual_ == Residual::kOuter ? h + x : x;
  }

  std::vector<MoeLayer*> routed_layers() override {
    std::vector<MoeLayer*> out;
    for (auto& l : iters_) out.push_back(l.get());
    return out;
  }

 private:
  Residual residual_;
  std::shared_ptr<ExpertPool> pool_;
  std::shared_ptr<SwiGLU> shared_;
  std::vector<std::shared_ptr<MoeLayer>> iters_;
  std::vector<std::shared_ptr<RMSNorm>> norms_;
};

std::shared_ptr<ModelBase> build(const ConfigNode& c) {
  const MoeModelRecipe r(c, "Chain-of-Experts");
  const int64_t C = r.moe.get<int64_t>("iterations", 2);
  if (C < 1) r.moe.fail("iterations", str("expected at least 1 iteration, got ", C));
  const auto residual = r.moe.get_choice<Residual>(
      "residual",
      {{"code", Residual::kCode}, {"paper", Residual::kPaper}, {"outer", Residual::kOuter}},
      Residual::kCode);
  auto make_router = [&] { return r.make_router(r.options.n_expert); };
  return r.build(
      [&](int64_t) {
        return std::make_shared<ChainOfExperts>(r.options, C, residual, make_router,
                                                r.backbone.norm_eps);
      },
      "coe_dlm");
}

MIXDIFF_REGISTER(models_registry(), "coe_dlm",
                 "Chain-of-Experts: C routing iterations per MoE block over one expert set, a "
                 "router per iteration; residual: code|paper|outer",
                 [](const ConfigNode& c) { return build(c); });

}  // namespace
}  // namespace mixdiff
