// Least-loaded expert parallelism (LLEP; Nguyen et al., "Least-Loaded Expert Parallelism: Load
// Balancing an Imbalanced Mixture-of-Experts", arXiv 2601.17111): when routing funnels most tokens
// to the experts of one rank, the excess tokens of an expert go, with that expert's weights, to
// the least-loaded ranks of the expert-parallel group, which compute them there; the weights'
// gradients return to the owner by the mirrored exchange. The layer computes exactly what plain
// expert parallelism computes; only where each token's expert runs changes.
//
// The plan (RECONSTRUCTED: the paper's knobs, this project's greedy; every rank computes it from
// the same global loads, so no plan is exchanged). N ranks, expert e owned by rank e / (E / N),
// global loads g_e, mean rank load mu = sum(g) / N:
//   - if the most loaded owner holds at most threshold * mu (lambda), nothing moves;
//   - otherwise each rank may take cap = ceil(capacity * mu) rows (alpha); experts are placed in
//     descending load (ties: lower id): first on their owner up to its cap, the rest in chunks on
//     the least-loaded rank (ties: lower rank) up to its cap, never a chunk under min_chunk rows
//     (m; a smaller remainder joins the previous piece), and once every rank is at cap the rest
//     goes to the least-loaded rank anyway.
// An expert's rows, ordered by sending rank and then by the sender's order, are cut into the
// plan's pieces in plan order (the owner's piece first unless the owner was already full).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mixdiff {

struct LlepOptions {
  double threshold = 1.3;   ///< lambda: act when max owner load > threshold * mean
  double capacity = 1.0;    ///< alpha: a rank's share of rows is capped at ceil(alpha * mean)
  int64_t min_chunk = 32;   ///< m: the smallest piece of an expert moved to another rank
};

/// One piece of an expert's rows: `count` rows of expert `expert` computed on rank `rank`.
struct LlepPiece {
  int64_t expert = 0;
  int rank = 0;
  int64_t count = 0;
};

struct LlepPlan {
  /// Pieces grouped by expert in increasing id, each expert's in plan order; empty when nothing
  /// moves (plain expert parallelism).
  std::vector<LlepPiece> pieces;
  std::vector<int64_t> rank_rows;  ///< rows each rank computes under the plan
  bool moves() const { return !pieces.empty(); }
};

/// The plan for global loads `load_E` over `n_ranks` ranks (E divisible by n_ranks).
LlepPlan least_loaded_plan(const std::vector<int64_t>& load_E, int n_ranks, const LlepOptions& o);

}  // namespace mixdiff
