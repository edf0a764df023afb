#include "dist/least_loaded.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace mixdiff {

LlepPlan least_loaded_plan(const std::vector<int64_t>& load_E, int n_ranks, const LlepOptions& o) {
  const auto E = static_cast<int64_t>(load_E.size());
  if (n_ranks < 1 || E % n_ranks != 0) {
    throw std::invalid_argument("least_loaded_plan: the expert count must divide over the ranks");
  }
  const int64_t per_rank = E / n_ranks;
  LlepPlan plan;
  plan.rank_rows.assign(static_cast<size_t>(n_ranks), 0);
  for (int64_t e = 0; e < E; ++e) plan.rank_rows[static_cast<size_t>(e / per_rank)] += load_E[e];
  const int64_t total = std::accumulate(load_E.begin(), load_E.end(), int64_t{0});
  if (total == 0) return plan;
  const double mean = static_cast<double>(total) / static_cast<double>(n_ranks);
  const int64_t busiest = *std::max_element(plan.rank_rows.begin(), plan.rank_rows.end());
  if (static_cast<double>(busiest) <= o.threshold * mean) return plan;

  const auto cap = static_cast<int64_t>(std::ceil(o.capacity * mean));
  const int64_t m = std::max<int64_t>(1, o.min_chunk);
  std::vector<int64_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return load_E[a] > load_E[b]; });
  std::vector<int64_t> rows(static_cast<size_t>(n_ranks), 0);
  std::vector<std::vector<LlepPiece>> by_expert(static_cast<size_t>(E));
  for (int64_t e : order) {
    int64_t left = load_E[e];
    if (left == 0) continue;
    auto& pieces = by_expert[static_cast<size_t>(e)];
    const int owner = static_cast<int>(e / per_rank);
    auto place = [&](int rank, int64_t n) {
      if (!pieces.empty() && pieces.back().rank == rank) {
        pieces.back().count += n;
      } else {
        pieces.push_back({e, rank, n});
      }
      rows[static_cast<size_t>(rank)] += n;
      left -= n;
    };
    int64_t native = std::min(left, std::max<int64_t>(0, cap - rows[static_cast<size_t>(owner)]));
    if (left - native < m) native = left;  // too little to be worth moving
    if (native > 0) place(owner, native);
    while (left > 0) {
      const int h = static_cast<int>(std::min_element(rows.begin(), rows.end()) - rows.begin());
      int64_t n = std::min(left, std::max(cap - rows[static_cast<size_t>(h)], m));
      if (left - n < m) n = left;
      place(h, n);
    }
  }
  bool moved = false;
  for (int64_t e = 0; e < E; ++e) {
    for (const auto& p : by_expert[static_cast<size_t>(e)]) {
      moved = moved || p.rank != static_cast<int>(e / per_rank);
      plan.pieces.push_back(p);
    }
  }
  if (!moved) {
    plan.pieces.clear();
    return plan;
  }
  plan.rank_rows = rows;
  return plan;
}

}  // namespace mixdiff
