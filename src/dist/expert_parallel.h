// Expert parallelism's groups and its token exchange (issue: experts sharded over ranks). The
// world of W ranks is cut into W / N data-parallel replicas of N expert-parallel ranks each
// (Megatron-Core's order: the expert-parallel group is N consecutive ranks):
//   rank = dp_rank * N + ep_rank
//   expert-parallel group of a rank:     { dp_rank * N + j : j < N }   (tokens are exchanged here)
//   expert-replica group of a rank:      { i * N + ep_rank : i < W / N } (ranks holding the same
//                                        experts: their expert gradients are averaged here)
// Each rank of an expert-parallel group holds E / N consecutive routed experts:
// rank j holds experts [j E / N, (j + 1) E / N).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/least_loaded.h"

namespace mixdiff {

namespace compat {
class Collectives;
}
class DataParallel;
class MoeLayer;

struct ParallelLayout {
  int world = 1;
  int expert_parallel = 1;  ///< N
  int rank = 0;
  /// Checks that N divides the world size (and `n_expert` when given; 0: not checked); throws
  /// ConfigError naming dist.expert_parallel otherwise.
  ParallelLayout(int world, int expert_parallel, int rank, int64_t n_expert = 0);
  int data_parallel() const { return world / expert_parallel; }
  int dp_rank() const { return rank / expert_parallel; }
  int ep_rank() const { return rank % expert_parallel; }
  /// Global ranks of this rank's expert-parallel group and of its expert-replica group.
  std::vector<int> expert_group() const;
  std::vector<int> replica_group() const;
  /// The routed experts [first, first + count) that expert-parallel rank `ep` holds.
  static int64_t first_expert(int64_t n_expert, int n, int ep) { return ep * (n_expert / n); }
};

/// What a rank's all-to-alls cost since the stats were last taken (forward and backward).
struct ExchangeStats {
  double seconds = 0;    ///< wall time inside the all-to-all calls
  int64_t bytes = 0;     ///< bytes this rank sent to other ranks
  int64_t rows = 0;      ///< token rows this rank's experts computed (forward)
  int64_t weight_rows = 0;  ///< experts whose weights this rank borrowed (least-loaded EP)
};

/// Differentiable all-to-all of rows over `group`: rows [sum(send[:j]), +send[j]) of x_RD go to
/// group rank j; the result holds, in rank order, the recv[j] rows each rank j sent here
/// (recv = what the peers' send counts name for this rank, exchanged beforehand). The backward
/// sends the gradient rows back along the same routes (the mirrored exchange). `stats`, when
/// given, gains the time and bytes of both directions.
at::Tensor exchange_rows(const at::Tensor& x_RD, const std::vector<int64_t>& send,
                         const std::vector<int64_t>& recv, compat::Collectives& group,
                         ExchangeStats* stats = nullptr);

/// recv[j] = the send count rank j of `group` has for this rank (an all-to-all of the counts,
/// through a tensor on `device`: the CPU for Gloo, the GPU for NCCL).
std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send, compat::Collectives& group,
                                     const c10::Device& device = c10::Device(c10::kCPU));

/// A run's expert parallelism: its groups, the sharding of the MoE layers' experts and the
/// reduction of their gradients. Gradients: a rank's loss is its own micro-batch's, and the
/// step averages over the W ranks, so non-expert gradients are averaged over the world
/// (DataParallel::average_gradients) and an expert's gradient, which after the all-to-all
/// backward already sums the tokens of its expert-parallel group, is summed over its replica
/// group and divided by W.
class ExpertParallel {
 public:
  /// Every rank of `dp` calls it (collectively: it makes the sub-groups). `llep`: least-loaded
  /// dispatch (dist/least_loaded.h) instead of plain expert parallelism.
  ExpertParallel(DataParallel& dp, const ParallelLayout& layout,
                 std::optional<LlepOptions> llep = std::nullopt,
                 const c10::Device& device = c10::Device(c10::kCPU));
  ~ExpertParallel();
  /// Keeps each layer's share of its routed experts (ParallelLayout::first_expert) and installs
  /// the all-to-all dispatcher. The layers' weights must already agree over the world (same
  /// seed, or broadcast first). Refuses (ConfigError) a layer whose experts live in a pool the
  /// model shares between layers (UniPool, ReXMoE, Chain-of-Experts) or whose expert count N does
  /// not divide. Returns the sharded parameters.
  std::vector<at::Tensor> shard(const std::vector<MoeLayer*>& layers);
  /// Sums the gradients of the sharded `params` over the replica group, divided by the world.
  void reduce_expert_gradients(const std::vector<at::Tensor>& params, int64_t bucket_bytes);
  /// The full [E, ...] tensor of this rank's shard [E / N, ...] (rows in expert order), the same
  /// on every rank of the expert group: for checkpoints, which hold whole expert tensors.
  at::Tensor gather(const at::Tensor& shard);
  /// The sum of `v` over the expert group, e.g. the squared norm of the local expert gradients,
  /// whose sum with the (replicated) rest is the global gradient norm.
  double sum_over_expert_group(double v);
  /// Element-wise sums over the expert group (small statistics, through the communication
  /// device: the CPU for Gloo, the GPU for NCCL).
  std::vector<double> sum_over_expert_group(const std::vector<double>& v);
  /// The all-to-all costs since the last call (every layer of this rank).
  ExchangeStats take_stats();
  /// Adds `s` back (costs set aside while evaluation ran).
  void put_back(const ExchangeStats& s);
  const ParallelLayout& layout() const { return layout_; }
  compat::Collectives& expert_group() { return *ep_; }
  compat::Collectives& replica_group() { return *replica_; }

 private:
  ParallelLayout layout_;
  std::optional<LlepOptions> llep_;
  c10::Device device_;
  std::unique_ptr<compat::Collectives> ep_, replica_;
  ExchangeStats stats_;
};

}  // namespace mixdiff
