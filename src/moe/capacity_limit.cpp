#include "moe/capacity_limit.h"

#include <torch/torch.h>

#include <cmath>

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
                                  double real_tokens) const {
  // Priority: lower is kept first.
  const at::Tensor priority_A = drop_ == DropPolicy::kProbability
                                    ? -a.gate_A.detach()
                                    : a.token_A.to(torch::kFloat64);
  const at::Tensor keep_K = keep(a.slot_A, priority_A, n_slots,
                                 capacity(n_slots, top_k, real_tokens));
  if (!keep_K.defined()) return a;
  return {a.token_A.index_select(0, keep_K), a.slot_A.index_select(0, keep_K),
          a.gate_A.index_select(0, keep_K)};
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
