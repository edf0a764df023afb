#include "moe/capacity_limit.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/config.h"
#include "core/errors.h"

namespace mixdiff {

ExpertCapacity::ExpertCapacity(double capacity_factor, DropPolicy drop)
    : factor_(capacity_factor), drop_(drop) {
  TORCH_CHECK(factor_ > 0, "[ExpertCapacity] capacity factor must be positive, got ", factor_);
}

int64_t ExpertCapacity::capacity(int64_t n_slots, int64_t top_k, double real_tokens) const {
  return static_cast<int64_t>(std::ceil(factor_ * real_tokens * static_cast<double>(top_k) /
                                        static_cast<double>(n_slots)));
}

Assignments ExpertCapacity::apply(const Assignments& a, int64_t n_slots, int64_t top_k,
                                  double real_tokens, int64_t n_tokens,
                                  const RankScope& scope) const {
  // Priority: lower is kept first.
  at::Tensor priority_A = drop_ == DropPolicy::kProbability ? -a.gate_A.detach().to(torch::kFloat64)
                                                            : a.token_A.to(torch::kFloat64);
  if (scope.world <= 1) {
    const at::Tensor keep_K = keep(a.slot_A, priority_A, n_slots,
                                   capacity(n_slots, top_k, real_tokens));
    if (!keep_K.defined()) return a;
    return {a.token_A.index_select(0, keep_K), a.slot_A.index_select(0, keep_K),
            a.gate_A.index_select(0, keep_K), keep_K};
  }
  // The global batch: every rank's [assignments, tokens, real tokens], then every rank's
  // (slot, priority) rows padded to the longest, concatenated in rank order.
  const int64_t A = a.size();
  const auto host = at::TensorOptions().dtype(torch::kFloat64);
  auto sizes_W3 = scope.gather(
      torch::tensor({static_cast<double>(A), static_cast<double>(n_tokens), real_tokens}, host)
          .view({1, 3}));
  const int W = scope.world;
  std::vector<int64_t> count(W), token_offset(W + 1, 0), first(W + 1, 0);
  double real = 0;
  int64_t longest = 0;
  for (int r = 0; r < W; ++r) {
    count[r] = static_cast<int64_t>(sizes_W3[r][0].item<double>());
    token_offset[r + 1] = token_offset[r] + static_cast<int64_t>(sizes_W3[r][1].item<double>());
    first[r + 1] = first[r] + count[r];
    real += sizes_W3[r][2].item<double>();
    longest = std::max(longest, count[r]);
  }
  if (longest == 0) return a;
  auto mine_P2 = torch::zeros({longest, 2}, host);
  mine_P2.narrow(0, 0, A).select(1, 0).copy_(a.slot_A.to(torch::kCPU).to(torch::kFloat64));
  mine_P2.narrow(0, 0, A).select(1, 1).copy_(priority_A.to(torch::kCPU));
  auto all_WP2 = scope.gather(mine_P2).view({W, longest, 2});
  std::vector<at::Tensor> slots, priorities;
  for (int r = 0; r < W; ++r) {
    auto rows = all_WP2[r].narrow(0, 0, count[r]);
    slots.push_back(rows.select(1, 0).to(torch::kLong));
    // Position: the global token index (rank r's tokens follow those of ranks < r).
    priorities.push_back(drop_ == DropPolicy::kPosition
                             ? rows.select(1, 1) + static_cast<double>(token_offset[r])
                             : rows.select(1, 1));
  }
  const at::Tensor keep_G = keep(torch::cat(slots), torch::cat(priorities), n_slots,
                                 capacity(n_slots, top_k, real));
  if (!keep_G.defined()) return a;
  const int64_t lo = first[scope.rank];
  auto mine = keep_G.masked_select((keep_G >= lo) & (keep_G < lo + A)) - lo;
  mine = mine.to(a.token_A.device());
  return {a.token_A.index_select(0, mine), a.slot_A.index_select(0, mine),
          a.gate_A.index_select(0, mine), mine};
}

std::string ExpertCapacity::describe() const {
  return str("capacity ", format_double(factor_), " (drop by ",
             drop_ == DropPolicy::kProbability ? "probability" : "position", ")");
}

at::Tensor ExpertCapacity::keep(const at::Tensor& expert_A, const at::Tensor& priority_A,
                                int64_t n_expert, int64_t capacity) {
  const int64_t A = expert_A.size(0);
  if (A == 0) return {};
  // Order the assignments by expert, then by priority (two stable sorts).
  auto by_priority_A = std::get<1>(priority_A.sort(/*stable=*/true, 0, /*descending=*/false));
  auto then_expert_A =
      std::get<1>(expert_A.index_select(0, by_priority_A).sort(/*stable=*/true, 0, false));
  auto order_A = by_priority_A.index_select(0, then_expert_A);
  auto counts_E = torch::bincount(expert_A, {}, n_expert);
  auto starts_E = counts_E.cumsum(0) - counts_E;
  // Rank of each ordered assignment inside its expert.
  auto rank_A = torch::arange(A, expert_A.options().dtype(torch::kLong)) -
                starts_E.index_select(0, expert_A.index_select(0, order_A));
  auto keep_A = rank_A < capacity;
  if (keep_A.all().item<bool>()) return {};
  return std::get<0>(order_A.masked_select(keep_A).sort());
}

}  // namespace mixdiff
