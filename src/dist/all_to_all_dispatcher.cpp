#include "dist/all_to_all_dispatcher.h"

#include "nn/checkpoint.h"

#include <torch/torch.h>

#include <algorithm>
#include <vector>

#include "core/compat.h"
#include "core/profile.h"
#include "dist/expert_parallel.h"
#include "moe/experts.h"

namespace mixdiff {

AllToAllDispatcher::AllToAllDispatcher(compat::Collectives& group, int64_t n_expert,
                                       std::optional<LlepOptions> llep, ExchangeStats* stats)
    : group_(group), n_expert_(n_expert), llep_(llep), stats_(stats) {
  TORCH_CHECK(n_expert_ % group_.size() == 0, "[all_to_all] ", n_expert_,
              " experts do not divide over ", group_.size(), " ranks");
}

at::Tensor AllToAllDispatcher::run(const ExpertPool& pool, const at::Tensor& x_TD,
                                   const at::Tensor& token_A, const at::Tensor& expert_A,
                                   const at::Tensor& gate_A) const {
  const int64_t T = x_TD.size(0), D = x_TD.size(1);
  const int64_t N = group_.size(), E_local = n_expert_ / N, E = n_expert_;
  // A recomputation (nn/checkpoint.h) exchanges again (its bytes and seconds are real costs), but
  // its rows are the first forward's: counted once.
  ExchangeStats* const rows_stats =
      recompute_pass() == RecomputePass::kRecompute ? nullptr : stats_;
  const int me = group_.rank();
  TORCH_CHECK(pool.n_expert() == E_local, "[all_to_all] this rank's pool holds ",
              pool.n_expert(), " experts, expected ", E_local, " (", n_expert_, " over ", N,
              " ranks)");
  profile::Scope dispatch_scope("dispatch");
  auto y_TD = torch::zeros({T, D}, x_TD.options());
  // 1. By expert, hence by owning rank.
  auto order_A = std::get<1>(expert_A.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto tok_A = token_A.index_select(0, order_A);
  auto gate_sorted_A = gate_A.index_select(0, order_A);
  auto expert_sorted_A = expert_A.index_select(0, order_A);
  const std::vector<int64_t> count_E = host_counts(expert_sorted_A, E);
  // Least-loaded mode: every rank's counts, then the same plan on every rank.
  LlepPlan plan;
  std::vector<int64_t> load_NE;
  if (llep_) {
    auto m_NE = torch::zeros({N, E}, torch::kLong);
    m_NE[me].copy_(torch::tensor(count_E, torch::kLong));
    std::vector<at::Tensor> v{m_NE.to(x_TD.device())};
    group_.all_reduce_sum(v);
    auto host = v[0].cpu().contiguous();
    load_NE.assign(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + N * E);
    std::vector<int64_t> load_E(static_cast<size_t>(E), 0);
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t e = 0; e < E; ++e) load_E[e] += load_NE[r * E + e];
    }
    plan = least_loaded_plan(load_E, static_cast<int>(N), *llep_);
  }
  // Destination rank and the expert's id there, per assignment: plain, the owner and the local
  // id; under a plan that moves rows, the piece's rank, where borrowed experts follow the own ones.
  at::Tensor dest_A, local_A;
  std::vector<std::vector<int64_t>> borrowed(static_cast<size_t>(N));
  if (!plan.moves()) {
    dest_A = expert_sorted_A.div(E_local, "floor");
    local_A = expert_sorted_A.remainder(E_local);
  } else {
    for (const auto& p : plan.pieces) {
      auto& b = borrowed[static_cast<size_t>(p.rank)];
      if (p.rank != p.expert / E_local && (b.empty() || b.back() != p.expert)) b.push_back(p.expert);
    }
    auto local_id = [&](int rank, int64_t e) {
      if (rank == e / E_local) return e % E_local;
      const auto& b = borrowed[static_cast<size_t>(rank)];
      return E_local + (std::lower_bound(b.begin(), b.end(), e) - b.begin());
    };
    const int64_t A = expert_sorted_A.size(0);
    std::vector<int64_t> dest(static_cast<size_t>(A)), local(static_cast<size_t>(A));
    size_t k = 0, pi = 0;
    for (int64_t e = 0; e < E; ++e) {
      // This rank's rows of e sit at [off, off + count_E[e]) of e's rows over the group.
      int64_t off = 0;
      for (int r = 0; r < me; ++r) off += load_NE[r * E + e];
      while (pi < plan.pieces.size() && plan.pieces[pi].expert < e) ++pi;
      size_t q = pi;
      int64_t piece_end = q < plan.pieces.size() ? plan.pieces[q].count : 0;
      for (int64_t i = 0; i < count_E[e]; ++i, ++k) {
        while (off + i >= piece_end) piece_end += plan.pieces[++q].count;
        dest[k] = plan.pieces[q].rank;
        local[k] = local_id(plan.pieces[q].rank, e);
      }
    }
    dest_A = torch::tensor(dest, torch::kLong).to(x_TD.device());
    local_A = torch::tensor(local, torch::kLong).to(x_TD.device());
    // Grouped by destination rank (stable: by expert inside a rank).
    auto by_dest_A = std::get<1>(dest_A.sort(/*stable=*/true, 0, false));
    tok_A = tok_A.index_select(0, by_dest_A);
    gate_sorted_A = gate_sorted_A.index_select(0, by_dest_A);
    local_A = local_A.index_select(0, by_dest_A);
    dest_A = dest_A.index_select(0, by_dest_A);
  }
  const std::vector<int64_t> send = host_counts(dest_A, N);
  const std::vector<int64_t> recv = exchange_counts(send, group_, x_TD.device());
  // 2. Rows and their expert ids to the computing ranks.
  auto xs_AD = x_TD.index_select(0, tok_A);
  auto xr_RD = exchange_rows(xs_AD, send, recv, group_, stats_);
  auto local_R = exchange_rows(local_A, send, recv, group_, stats_);
  // Borrowed experts' weights from their owners (rows in owner order, i.e. by expert id).
  at::Tensor w_gate = pool.w_gate(), w_up = pool.w_up(), w_down = pool.w_down();
  int64_t n_here = E_local;
  if (plan.moves()) {
    std::vector<int64_t> lend, send_w(static_cast<size_t>(N), 0), recv_w(static_cast<size_t>(N), 0);
    for (int64_t h = 0; h < N; ++h) {
      for (int64_t e : borrowed[static_cast<size_t>(h)]) {
        const int64_t owner = e / E_local;
        if (owner == me) {
          lend.push_back(e - me * E_local);
          ++send_w[static_cast<size_t>(h)];
        }
        if (h == me) ++recv_w[static_cast<size_t>(owner)];
      }
    }
    const int64_t F = pool.d_expert(), n = static_cast<int64_t>(lend.size());
    auto idx = torch::tensor(lend, torch::kLong).to(w_gate.device());
    auto rows = torch::cat({w_gate.index_select(0, idx).reshape({n, F * D}),
                            w_up.index_select(0, idx).reshape({n, F * D}),
                            w_down.index_select(0, idx).reshape({n, D * F})},
                           1);
    auto got = exchange_rows(rows, send_w, recv_w, group_, stats_);
    const int64_t nb = got.size(0);
    w_gate = torch::cat({w_gate, got.narrow(1, 0, F * D).reshape({nb, F, D})});
    w_up = torch::cat({w_up, got.narrow(1, F * D, F * D).reshape({nb, F, D})});
    w_down = torch::cat({w_down, got.narrow(1, 2 * F * D, D * F).reshape({nb, D, F})});
    n_here += nb;
    if (rows_stats) rows_stats->weight_rows += nb;
  }
  if (rows_stats) rows_stats->rows += xr_RD.size(0);
  // 3. Regrouped by expert: one grouped SwiGLU.
  auto by_expert_R = std::get<1>(local_R.sort(/*stable=*/true, 0, false));
  at::Tensor ys_RD;
  {
    profile::Scope sc("experts");
    auto ye_RD = grouped_swiglu(xr_RD.index_select(0, by_expert_R), host_counts(local_R, n_here),
                                w_gate, w_up, w_down);
    ys_RD = at::empty_like(ye_RD).index_copy(0, by_expert_R, ye_RD);  // back to arrival order
  }
  // 4. Results back to the tokens' ranks, in the order they were sent. With no assignments the
  // index_add of zero rows still joins the graph, so this rank's backward takes part in the
  // mirrored exchanges.
  auto yb_AD = exchange_rows(ys_RD, recv, send, group_, stats_);
  return y_TD.index_add(0, tok_A, yb_AD * gate_sorted_A.unsqueeze(1).to(yb_AD.dtype()));
}

}  // namespace mixdiff
