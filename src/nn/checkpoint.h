// Activation checkpointing (recipe key train.activation_checkpointing; algorithms.md 2.6's
// pitfall): a checkpointed region keeps only its inputs through the forward and runs again,
// with grad, inside the backward (the reentrant form of torch.utils.checkpoint, as Megatron-Core
// and torchtitan recompute blocks).
//
// A recomputation must be the same computation as the first forward, not a second draw. Two
// things make it so:
//   - the pass: the first forward of a region runs without grad but is a training forward (it
//     updates routing state: global-batch counts, balancer statistics, telemetry, BIP's dual
//     sweeps); the recomputation updates nothing and only rebuilds the graph. Code asks
//     recompute_pass(), and updates_state() (moe/router.h) answers from it;
//   - the replay log: what the first forward decided that a second one could decide otherwise
//     (an MoE layer's capacity drops, which depend on every rank's tokens, and a block routing
//     policy's allowed experts) is recorded there, in call order, and read back by the
//     recomputation instead of being decided again. The log lives with the region's autograd
//     node and dies with the graph.
// Randomness inside a region is a function of (seed, step, micro-batch, layer) (ERC's noise), so
// it is drawn again identically; the diffusion noise (masks, random remasking) is drawn before
// the model and is not inside any region.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

namespace mixdiff {

/// What the current forward of a checkpointed region is.
enum class RecomputePass {
  kNone,       ///< not inside a checkpointed region: an ordinary forward
  kFirst,      ///< a region's first forward (no grad; a training forward all the same)
  kRecompute,  ///< the region's recomputation in the backward (grad on; changes no state)
};

/// The pass of this thread's current forward.
RecomputePass recompute_pass();

/// In a region's first forward: appends `entry` to the region's replay log. Elsewhere: nothing.
void replay_record(std::vector<at::Tensor> entry);

/// In a recomputation: the next entry of the region's replay log, in the order the first forward
/// recorded them (`who` names the caller in the error when the log runs out).
std::vector<at::Tensor> replay_next(const std::string& who);

/// Recomputations run in this process so far (tests check that regions were recomputed).
int64_t regions_recomputed();

using RegionFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

/// Runs fn(inputs) as a checkpointed region: without grad now, keeping only `inputs`; the
/// backward runs fn again with grad on the saved inputs and backpropagates through it (the
/// parameters fn uses get their gradients there). `fn` must take everything else it needs by
/// value: it runs again after the caller has returned. A region inside a region runs plainly.
std::vector<at::Tensor> checkpoint(const RegionFn& fn, const std::vector<at::Tensor>& inputs);

/// Which parts of a model train.activation_checkpointing recomputes.
struct ActivationCheckpointing {
  enum class Mode {
    kNone,    ///< keep every activation
    kBlocks,  ///< every transformer block (only its input is kept)
    kMoe,     ///< only the feed-forward half of blocks whose feed-forward is routed (MoE, CoE)
    kEveryK,  ///< every k-th block: blocks k-1, 2k-1, ... (torchtitan's selective layer option)
  };
  Mode mode = Mode::kNone;
  int64_t every = 2;  ///< k of kEveryK (train.activation_checkpointing_every)
  /// Whether block `i` is recomputed whole.
  bool whole_block(int64_t i) const {
    return mode == Mode::kBlocks || (mode == Mode::kEveryK && (i + 1) % every == 0);
  }
  /// The recipe value: none, blocks, moe or every_k.
  std::string name() const;
};

}  // namespace mixdiff
