// The memory plan of a training run (`mixdiff inspect --recipe R --memory`, and one line at the
// start of `mixdiff train`): the bytes each rank holds at the peak of a step, by kind, for the
// recipe's world size and parallel layout, before anything is trained.
//
//   runtime     the process itself (LibTorch, data, tokenizer, BLAS buffers, the allocator's
//               slack): the probe's peak RSS less the tensors it held
//   parameters  this rank's: every replicated tensor and buffer, and E / expert_parallel routed
//               experts
//   optimizer   AdamW's two fp32 moments of this rank's parameters, or of its pieces under
//               dist.shard_optimizer (replicated tensors over the world, expert shards over
//               their replica group)
//   comm        the gradient bucket of the all-reduce (dist.bucket_mb), or under sharding the
//               reduce-scatter's receive bucket plus the rank's persistent gradient pieces; the
//               all-to-all buffers of expert parallelism (tokens x top-K x d_model, sent and
//               received)
//   step        the peak of one step's forward and backward above the model: activations,
//               logits, the loss, gradients (kept across micro-batches under grad_accum) and
//               temporaries
// Activations and the step peak are measured, not modelled, under a counting CPU allocator,
// once with the recipe's train.activation_checkpointing and once without: what each block keeps
// for the backward from forwards of 1 and 2 sequences, extrapolated linearly to the micro-batch
// (every kept tensor is proportional to the sequences); the peak of the step (where it falls in
// the backward moves with the batch, so it is not linear) from a forward and backward of the
// micro-batch itself (two micro-batches under grad_accum, whose gradients persist), unless the
// states and the kept activations alone exceed the host's available memory (then the step is
// the lower bound kept activations + gradients, and the plan says so). The probe runs in eval
// mode with grad on, so no routing state (balancer statistics, global-batch counts, telemetry)
// changes. On a CUDA device the probe is skipped and the plan holds the device's states only
// (no host runtime, no activations).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mixdiff {

struct TrainerParts;

struct MemoryPlan {
  std::string device;
  int world = 1;
  int64_t expert_parallel = 1;
  bool shard_optimizer = false;
  std::string checkpointing = "none";  ///< train.activation_checkpointing
  int64_t checkpointing_every = 2;     ///< train.activation_checkpointing_every
  int64_t batch = 0, seq_len = 0, grad_accum = 1;
  bool probed = false;  ///< activations and the step peak were measured (CPU)
  bool lower_bound = false;  ///< the micro-batch did not fit this host: the step is a floor
  bool compared = false;     ///< the configuration without checkpointing was probed too
  /// runtime: the process (LibTorch, BLAS buffers, the allocator's slack), measured as the
  /// probe's peak RSS less its tensors; runtime_none: the same for the probe without checkpointing.
  double runtime = 0, runtime_none = 0, params = 0, grads = 0, optimizer = 0, comm = 0;
  /// Bytes each block keeps for the backward at the micro-batch: without checkpointing, and with
  /// the recipe's (equal when it is none).
  std::vector<double> block, block_ckpt;
  double step = 0, step_none = 0;  ///< step peak with the recipe's checkpointing, and without
  double total() const { return runtime + params + optimizer + comm + step; }
  double total_none() const { return runtime_none + params + optimizer + comm + step_none; }
  /// One line for `train`'s start.
  std::string summary() const;
  /// The table of `inspect --memory`.
  std::string table() const;
  nlohmann::json to_json() const;
};

/// The plan of `parts` (built from the recipe, not yet trained) on `world` ranks; `compare`: also
/// probe the run without checkpointing (inspect; `train` probes only its own configuration, so
/// that the probe does not raise the run's peak RSS above its own).
MemoryPlan plan_memory(TrainerParts& parts, int world, bool compare);

/// Memory this host can still give (MemAvailable of /proc/meminfo), in bytes; 0 if unknown.
double host_available_bytes();

}  // namespace mixdiff
