// The loop dispatcher, the reference twin of `sorted`: per expert, find its rows, run a plain
// SwiGLU through autograd, index_add. Obvious and slow; the parity tests hold `sorted` to it.
#include <torch/torch.h>

#include "moe/dispatcher.h"
#include "moe/experts.h"

namespace mixdiff {
namespace {

class LoopDispatcher : public Dispatcher {
 public:
  at::Tensor run(const ExpertPool& pool, const at::Tensor& x_TD, const at::Tensor& token_A,
                 const at::Tensor& expert_A, const at::Tensor& gate_A) const override {
    namespace F = torch::nn::functional;
    auto y_TD = torch::zeros({x_TD.size(0), x_TD.size(1)}, x_TD.options());
    for (int64_t e = 0; e < pool.n_expert(); ++e) {
      auto rows_R = (expert_A == e).nonzero().squeeze(1);
      if (rows_R.numel() == 0) continue;
      auto tok_R = token_A.index_select(0, rows_R);
      auto xe_RD = x_TD.index_select(0, tok_R);
      const auto dt = xe_RD.scalar_type();  // as grouped_swiglu: the activations' dtype
      auto he_RD = F::linear(F::silu(F::linear(xe_RD, pool.w_gate()[e].to(dt))) *
                                 F::linear(xe_RD, pool.w_up()[e].to(dt)),
                             pool.w_down()[e].to(dt));
      // .to(y's dtype): under autocast the linears above return bf16 while y has x's dtype.
      y_TD = y_TD.index_add(
          0, tok_R,
          (he_RD * gate_A.index_select(0, rows_R).unsqueeze(1).to(he_RD.dtype())).to(y_TD.scalar_type()));
    }
    return y_TD;
  }
  std::string name() const override { return "loop"; }
};

MIXDIFF_REGISTER(dispatchers_registry(), "loop",
                 "per expert: its rows through a plain SwiGLU under autograd (the reference twin "
                 "of sorted; slow)",
                 [](const ConfigNode&) -> std::shared_ptr<Dispatcher> {
                   return std::make_shared<LoopDispatcher>();
                 });

}  // namespace
}  // namespace mixdiff
