// Data parallelism over c10d (design.md "data flow"; torchrun's environment contract).
//
// A worker learns its place from the variables every torchrun-style launcher sets: RANK,
// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (`mixdiff launch`, torchrun
// --no-python, or a Slurm script mapping SLURM_PROCID and friends). Without them the process
// trains alone and every collective below is the identity.
//
// DataParallel holds the process group (Gloo for CPU tensors; compat::make_process_group hides
// the LibTorch 1.13 / 2.x difference) and the operations the trainer needs: parameters and
// buffers broadcast from rank 0, gradients averaged in buckets (flattened, summed, divided by the
// world size, so the step equals single-process training on the global batch), small statistics
// summed (global-batch routing counts, aux-free bias counts, losses), and a replica check.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace mixdiff {

namespace compat {
class Collectives;
}

struct DistEnv {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  int local_world = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// Reads the torchrun variables; all absent means one process. A malformed or inconsistent
  /// value throws ConfigError naming the variable.
  static DistEnv from_env();
};

/// Sums the gradients of `params` over `group` in flattened buckets of about `bucket_bytes` (one
/// dtype each), then multiplies them by `scale`; a parameter without a gradient counts as zeros.
void sum_gradients(compat::Collectives& group, const std::vector<at::Tensor>& params,
                   int64_t bucket_bytes, double scale);

class DataParallel {
 public:
  /// world == 1: no process group. Otherwise rendezvous (throws InputError on failure): Gloo
  /// for a CPU run, NCCL for a CUDA one (host tensors are then reduced through the device).
  DataParallel(const DistEnv& env, double timeout_s, const at::Device& device = at::kCPU);
  ~DataParallel();

  int rank() const { return env_.rank; }
  int world() const { return env_.world; }
  bool is_main() const { return env_.rank == 0; }
  bool active() const { return env_.world > 1; }

  /// In-place sum over ranks.
  void all_reduce_sum(at::Tensor& t);
  /// In-place element-wise max over ranks.
  void all_reduce_max(at::Tensor& t);
  /// Rank 0's parameters and buffers to every rank.
  void broadcast_state(torch::nn::Module& m);
  /// Averages the gradients of `params` over ranks in buckets of about `bucket_bytes`; a
  /// parameter without a gradient (an expert nobody routed to) counts as zeros on that rank.
  void average_gradients(const std::vector<at::Tensor>& params, int64_t bucket_bytes);
  /// Whether every rank holds bit-identical parameters and buffers (a fingerprint compared
  /// across ranks).
  bool replicas_identical(const torch::nn::Module& m);
  void barrier();
  /// A process group of the global ranks `members` (this rank among them), e.g. an
  /// expert-parallel group (dist/expert_parallel.h); every member calls it with the same
  /// arguments. Null for a single process.
  std::unique_ptr<compat::Collectives> subgroup(const std::vector<int>& members,
                                                const std::string& name);
  /// The world's process group (null for a single process).
  compat::Collectives* group() { return pg_.get(); }
  /// Seconds spent in gradient all-reduces since the last call.
  double take_comm_seconds();

 private:
  DistEnv env_;
  at::Device comm_device_ = at::kCPU;
  std::unique_ptr<compat::Collectives> pg_;
  double comm_s_ = 0;
};

}  // namespace mixdiff
