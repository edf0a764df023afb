#include "dist/all_to_all_dispatcher.h"

#include <torch/torch.h>

#include <vector>

#include "core/compat.h"
#include "core/profile.h"
#include "dist/expert_parallel.h"
#include "moe/experts.h"

namespace mixdiff {

AllToAllDispatcher::AllToAllDispatcher(compat::Collectives& group, int64_t n_expert)
    : group_(group), n_expert_(n_expert) {
  TORCH_CHECK(n_expert_ % group_.size() == 0, "[all_to_all] ", n_expert_,
              " experts do not divide over ", group_.size(), " ranks");
}

at::Tensor AllToAllDispatcher::run(const ExpertPool& pool, const at::Tensor& x_TD,
                                   const at::Tensor& token_A, const at::Tensor& expert_A,
                                   const at::Tensor& gate_A) const {
  const int64_t T = x_TD.size(0), D = x_TD.size(1);
  const int64_t N = group_.size(), E_local = n_expert_ / N;
  TORCH_CHECK(pool.n_expert() == E_local, "[all_to_all] this rank's pool holds ",
              pool.n_expert(), " experts, expected ", E_local, " (", n_expert_, " over ", N,
              " ranks)");
  profile::Scope dispatch_scope("dispatch");
  auto y_TD = torch::zeros({T, D}, x_TD.options());
  // 1. By expert, hence by destination rank.
  auto order_A = std::get<1>(expert_A.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto tok_A = token_A.index_select(0, order_A);
  auto gate_sorted_A = gate_A.index_select(0, order_A);
  auto expert_sorted_A = expert_A.index_select(0, order_A);
  auto dest_A = expert_sorted_A.div(E_local, "floor");
  const std::vector<int64_t> send = host_counts(dest_A, N);
  const std::vector<int64_t> recv = exchange_counts(send, group_, x_TD.device());
  // 2. Rows and their local expert ids to the experts' ranks.
  auto xs_AD = x_TD.index_select(0, tok_A);
  auto xr_RD = exchange_rows(xs_AD, send, recv, group_);
  auto local_R = exchange_rows(expert_sorted_A.remainder(E_local), send, recv, group_);
  // 3. Regrouped by local expert: one grouped SwiGLU.
  auto by_expert_R = std::get<1>(local_R.sort(/*stable=*/true, 0, false));
  at::Tensor ys_RD;
  {
    profile::Scope sc("experts");
    auto ye_RD = grouped_swiglu(xr_RD.index_select(0, by_expert_R), host_counts(local_R, E_local),
                                pool.w_gate(), pool.w_up(), pool.w_down());
    ys_RD = at::empty_like(ye_RD).index_copy(0, by_expert_R, ye_RD);  // back to arrival order
  }
  // 4. Results back to the tokens' ranks, in the order they were sent. With no assignments the
  // index_add of zero rows still joins the graph, so this rank's backward takes part in the
  // mirrored exchanges.
  auto yb_AD = exchange_rows(ys_RD, recv, send, group_);
  return y_TD.index_add(0, tok_A, yb_AD * gate_sorted_A.unsqueeze(1).to(yb_AD.dtype()));
}

}  // namespace mixdiff
