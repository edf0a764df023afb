// Sharded optimizer state: ZeRO stage 1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
// Toward Training Trillion Parameter Models", arXiv 1910.02054), recipe key
// dist.shard_optimizer: true.
//
// The parameters are laid out as the gradient all-reduce lays them out: consecutive buckets of
// about dist.bucket_mb, one dtype each. Each bucket of n elements is cut into W equal pieces of
// c = ceil(n / W) (the last padded with zeros) and rank r owns piece r of every bucket. A step:
//   1. reduce-scatter each bucket's gradients: rank r receives the sum over ranks of its piece,
//      times the scale (1/W); the full gradients are dropped;
//   2. the global squared norm is the sum over ranks of the owned pieces' (each element is owned
//      once), so clipping sees the norm an unsharded run sees;
//   3. AdamW on the owned pieces only (the same fused pass, the same formula and the options of
//      the parameter's group in the wrapped torch optimizer: lr, betas, eps, weight decay);
//   4. all-gather each bucket's updated pieces into every rank's parameters.
// The AdamW moments therefore take 2 x 4 x N / W bytes per rank instead of 2 x 4 x N. Under
// expert parallelism the replicated parameters are sharded over the world and each expert shard
// over its replica group (the ranks that hold the same experts), when that has more than one rank.
//
// Checkpoints stay layout-independent: materialize() all-gathers whole moments into the wrapped
// optimizer's state (what optimizer.pt holds in an unsharded run) on the rank that writes, and
// release() frees them after the save; a resumed run absorb()s its pieces of whatever
// optimizer.pt held, so a run resumes with or without sharding and on another world size.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace torch::optim {
class Optimizer;
}

namespace mixdiff {

namespace compat {
class Collectives;
}

class ShardedAdamW {
 public:
  /// `params`: tensors of `opt`'s parameter groups (contiguous), in a fixed order that every
  /// rank of `group` shares. `scale` multiplies the reduced gradients (1 / W).
  ShardedAdamW(compat::Collectives& group, std::vector<at::Tensor> params,
               torch::optim::Optimizer& opt, int64_t bucket_bytes, double scale);
  ~ShardedAdamW();

  /// Step 1 above; a parameter without a gradient counts as zeros. Returns the squared L2 norm
  /// of this rank's reduced pieces.
  double reduce_scatter_gradients();
  /// Steps 3 and 4, the gradients multiplied by `grad_scale` inside the update (clipping).
  void step(double grad_scale);
  /// Whole moments gathered (collective), e.g. before a checkpoint, and written into the wrapped
  /// optimizer's state when `install` (only the rank that writes needs them; the others drop
  /// each bucket after its all-gather).
  void materialize(bool install);
  /// Removes the whole moments that materialize(true) installed (this rank keeps its pieces).
  void release();
  /// This rank's pieces of the wrapped optimizer's whole moments (left there by a checkpoint or
  /// materialize()); the whole moments are removed from it. No state there: moments start at 0.
  void absorb();

  int64_t owned_numel() const { return owned_; }   ///< elements of each owned buffer (padded)
  int64_t total_numel() const { return total_; }   ///< elements of the parameters
  /// Seconds spent in reduce-scatters and all-gathers since the last call.
  double take_comm_seconds();

 private:
  struct Segment {
    size_t param;        ///< index into params_
    int64_t offset;      ///< first element within the parameter
    int64_t numel;
    int64_t owned;       ///< first element within the owned buffers
  };
  struct Bucket {
    size_t first, last;  ///< params_[first, last)
    size_t seg_first, seg_last;  ///< this rank's segments_[seg_first, seg_last)
    int64_t numel;       ///< n: elements of its parameters
    int64_t piece;       ///< c = ceil(n / W)
    int64_t owned;       ///< where this rank's piece starts in the owned buffers
  };
  at::Tensor gather_bucket(const Bucket& b, const at::Tensor& owned_buffer);

  compat::Collectives& group_;
  std::vector<at::Tensor> params_;
  torch::optim::Optimizer& opt_;
  double scale_;
  std::vector<size_t> group_of_;  ///< params_[i]'s parameter group in opt_
  std::vector<Bucket> buckets_;
  std::vector<Segment> segments_;  ///< ordered by parameter, then offset
  std::vector<int64_t> steps_;     ///< AdamW step count per parameter
  at::Tensor grad_, exp_avg_, exp_avg_sq_;  ///< owned buffers [owned_]
  int64_t owned_ = 0, total_ = 0;
  double comm_s_ = 0;
};

}  // namespace mixdiff
