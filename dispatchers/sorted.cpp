// The sorted local dispatcher (the default): assignments are sorted by expert (stable), the routed
// rows gathered once, each expert runs its three GEMMs on its contiguous slice (grouped_swiglu:
// one autograd node for all experts), the gates are applied and the rows combined with one
// index_add.
#include <torch/torch.h>

#include "core/profile.h"
#include "moe/dispatcher.h"
#include "moe/experts.h"

namespace mixdiff {
namespace {

class SortedDispatcher : public Dispatcher {
 public:
  at::Tensor run(const ExpertPool& pool, const at::Tensor& x_TD, const at::Tensor& token_A,
                 const at::Tensor& expert_A, const at::Tensor& gate_A) const override {
    const int64_t T = x_TD.size(0), E = pool.n_expert();
    auto y_TD = torch::zeros({T, x_TD.size(1)}, x_TD.options());
    if (token_A.numel() == 0) return y_TD;
    profile::Scope dispatch_scope("dispatch");
    auto order_A = std::get<1>(expert_A.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    auto tok_A = token_A.index_select(0, order_A);
    auto gate_sorted_A = gate_A.index_select(0, order_A);
    const std::vector<int64_t> counts = host_counts(expert_A, E);
    auto xs_AD = x_TD.index_select(0, tok_A);
    at::Tensor ys_AD;
    {
      profile::Scope sc("experts");
      ys_AD = grouped_swiglu(xs_AD, counts, pool.w_gate(), pool.w_up(), pool.w_down());
    }
    return y_TD.index_add(0, tok_A, ys_AD * gate_sorted_A.unsqueeze(1).to(ys_AD.dtype()));
  }
  std::string name() const override { return "sorted"; }
};

MIXDIFF_REGISTER(dispatchers_registry(), "sorted",
                 "sort the assignments by expert, one grouped SwiGLU over contiguous slices, "
                 "one index_add (default)",
                 [](const ConfigNode&) -> std::shared_ptr<Dispatcher> {
                   return std::make_shared<SortedDispatcher>();
                 });

}  // namespace
}  // namespace mixdiff
