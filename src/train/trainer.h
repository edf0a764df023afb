// The training loop: a recipe's parts (model, noise schedule, loss terms, data, optimizer, LR
// schedule) built through the registries, then per step:
//   for each micro-batch: sequences -> t ~ schedule -> masks -> forward (logits at masked
//   positions) -> weighted loss terms -> backward (scaled by 1 / grad_accum)
//   -> clip -> lr -> optimizer step -> metrics -> eval / checkpoint when due.
// Determinism: the noise of step s, micro-batch m comes from a generator seeded with
// hash(seed, s, m), and the data stream is indexed by sequence count, so a run resumed from a
// checkpoint reproduces the uninterrupted run's losses exactly (CPU).
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/signals.h"
#include "dist/dist.h"
#include "dist/least_loaded.h"
#include "moe/context.h"
#include "diffusion/diffusion.h"
#include "loss/loss.h"
#include "loss/objective.h"
#include "model/model.h"
#include "train/data_source.h"
#include "train/optim.h"

namespace mixdiff {

struct TrainOptions {
  int64_t steps = 0;
  int64_t batch_size = 0;  ///< sequences per micro-batch
  int64_t grad_accum = 1;
  double grad_clip = 1.0;  ///< 0 disables clipping
  int64_t log_every = 10;
  int64_t ckpt_every = 0;  ///< 0: only at the end (and on interrupt)
  int64_t keep_checkpoints = 2;
  /// A step whose loss or gradient norm is NaN/Inf is never applied. on_nonfinite: stop (write a
  /// checkpoint of the last good state and exit 3) or skip (drop the step's update, go on; stop
  /// as above after max_skips consecutive skips).
  std::string on_nonfinite = "stop";
  int64_t max_skips = 10;
  double random_length_prob = 0.0;  ///< LLaDA's 1%: truncate the batch to a random length
  /// train.activation_checkpointing (none | blocks | moe | every_k) and
  /// train.activation_checkpointing_every (k): what training forwards recompute in the backward
  /// (nn/checkpoint.h).
  ActivationCheckpointing activation_checkpointing;
  /// diffusion.objective (registry `objectives`, loss/objective.h): masked (default) or block.
  std::shared_ptr<DiffusionObjective> objective;
  int64_t eval_every = 0;           ///< 0: only at the end
  int64_t eval_sequences = 128;
  int64_t eval_batch_size = 32;
  int64_t eval_seed = 1234;
  int64_t eval_draws = 1;  ///< mask draws per validation window (eval.draws)
  int64_t eval_final_draws = 1;  ///< the same for the evaluation after the last step
  bool eval_exact = false;       ///< eval.masking: exact (the bound's l-form)
  int64_t bucket_bytes = 25 << 20;  ///< gradient all-reduce bucket (dist.bucket_mb)
  double dist_timeout_s = 300;      ///< rendezvous and collective timeout (dist.timeout_s)
  /// dist.expert_parallel: N ranks share each MoE layer's routed experts (E / N each; tokens
  /// exchanged all-to-all, dist/expert_parallel.h); N divides the world size and E.
  int64_t expert_parallel = 1;
  /// dist.ep_balance: least_loaded (dist.llep: threshold, capacity, min_chunk) or none (plain).
  std::optional<LlepOptions> llep;
  /// dist.shard_optimizer: ZeRO stage 1, AdamW moments sharded over the data-parallel ranks
  /// (dist/zero.h); no effect on one process.
  bool shard_optimizer = false;
  static TrainOptions from(const ConfigNode& recipe);
};

/// The recipe's `upcycle` section, read by `mixdiff upcycle` (src/app/upcycle.cpp) and
/// validated with every recipe that has one.
struct UpcycleOptions {
  std::string selection = "uniform";  ///< uniform | utility
  std::string metric = "weight_norm";  ///< weight_norm | gradient_squared | weight_grad_product | approx_fisher
  int64_t max_duplicates = 3;
  int64_t utility_batches = 4;
  std::string copies = "dormant";      ///< dormant (function-preserving) | paper (bias + noise)
  double dormant_margin = 10.0;
  std::string optimizer = "copy";      ///< copy | reset
  bool reset_step = false;
  int64_t seed = 0;
  static UpcycleOptions from(const ConfigNode& section);
};

struct WeightedLoss {
  std::string name;
  double weight = 1.0;
  std::shared_ptr<LossTerm> term;  ///< the diffusion loss (null for a routing loss)
  bool routing = false;  ///< a routing loss (moe/routing_loss.h): computed inside the MoE layers
};

struct TrainerParts {
  std::shared_ptr<ModelBase> model;
  std::shared_ptr<NoiseSchedule> schedule;
  std::vector<WeightedLoss> losses;
  std::unique_ptr<DataSource> data;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::shared_ptr<LrSchedule> lr_schedule;
  double base_lr = 0;
  TrainOptions options;
  int64_t seed = 0;
  std::string name;  ///< run name (recipe key `name`): the default run folder is runs/<name>
  /// Recipe `init: {checkpoint: RUN_OR_CKPT, routers: keep|fresh}`: a fresh run starts from
  /// that checkpoint's weights (retrofitting, e.g. token choice -> expert choice).
  std::string init_checkpoint;
  std::string init_routers = "keep";
  /// Data parallelism (null or world 1: one process). Set by the caller after the recipe is
  /// validated, because rendezvous waits for the other ranks.
  std::shared_ptr<DataParallel> dp;
  at::Device device = at::kCPU;      ///< runtime.device: cpu | cuda | cuda:N
  at::ScalarType dtype = at::kFloat; ///< runtime.dtype: fp32 | bf16 (CUDA autocast)
};

/// The batch's tensors on `device` (noise is drawn on the CPU, then moved).
DiffusionBatch to_device(const DiffusionBatch& b, const at::Device& device);

/// runtime.device, checked against this build and machine.
at::Device parse_device(const ConfigNode& runtime);
/// runtime.dtype: fp32, or bf16 (autocast; CUDA only).
at::ScalarType parse_dtype(const ConfigNode& runtime, const at::Device& device);

/// Builds every part of a recipe (data first: it fixes model.vocab_size when absent). The model
/// is initialised from `seed` (recipe key `seed`). Throws ConfigError/DataError on bad input.
/// `data`, when given, replaces the recipe's data source (`mixdiff bench train` feeds random
/// tokens of the recipe's shape through the same parts).
TrainerParts build_trainer_parts(const ConfigNode& recipe,
                                 std::unique_ptr<DataSource> data = nullptr);

/// Per MoE layer (moe_layers() order), the run's mean real experts per token from the routing
/// telemetry in `metrics_path` (every logged interval, weighted by its tokens); empty when the
/// file has none.
std::vector<double> measured_experts_per_token(const std::string& metrics_path, size_t n_layers);

/// What one optimizer step did.
struct StepResult {
  double loss = 0;          ///< mean diffusion loss over the micro-batches (and ranks' logs)
  int64_t tokens = 0;       ///< tokens consumed by all ranks
  double grad_norm = 0;     ///< before clipping; NaN when clipping is off
  bool nonfinite = false;   ///< loss or gradient NaN/Inf on some rank: nothing was applied
  std::vector<double> aux;  ///< routing-loss values, mean over layers and micro-batches
};

/// Seconds per phase of one step, with the device synchronised at every phase boundary (which
/// costs a GPU its overlap of host and device work, so only benchmarks ask for it).
struct StepTimes {
  double data = 0;       ///< batch, noise and masks, moved to the device
  double forward = 0;    ///< forward and loss terms
  double backward = 0;   ///< backward (and the gradient all-reduce)
  double optimizer = 0;  ///< norm, clipping, optimizer step, routing-state updates
};

/// Progress of a run; the part of it that checkpoints carry.
struct TrainerState {
  int64_t step = 0;        ///< optimizer steps done
  int64_t tokens = 0;      ///< training tokens consumed (all positions, masked or not)
  int64_t data_cursor = 0; ///< training sequences consumed (the data stream position)
  double elapsed_s = 0;    ///< wall time spent training before this process
  double last_val_nelbo = -1;
  nlohmann::json provenance;  ///< where the weights came from (upcycling), carried by checkpoints
};


class RoutingTelemetry;
class ExpertParallel;
class ShardedAdamW;

class Trainer {
 public:
  /// `run_dir` exists and holds recipe.yaml; `recipe_yaml` is the resolved recipe. An empty
  /// `run_dir` makes a trainer that only steps (run_step): logs go to stdout alone and it
  /// cannot checkpoint.
  Trainer(TrainerParts parts, std::string run_dir, std::string recipe_yaml);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  /// Restores model, optimizer and state from a verified checkpoint folder.
  void restore(const std::string& ckpt_dir);
  /// Fresh run with `init:`: copies every tensor of the init checkpoint by name and shape.
  /// Router tensors (names with ".router.") whose shape differs, that the source lacks, or all of
  /// them with routers: fresh, keep the new router's initialisation; any other mismatch is a
  /// CheckpointError. The provenance goes into every checkpoint of the run.
  void initialize_from_checkpoint();
  /// Runs to options.steps. Returns 0 when finished, 128 + signal when stopped by a signal
  /// (after saving a checkpoint).
  int fit();
  const TrainerState& state() const { return state_; }
  ModelBase& model() { return *parts_.model; }
  const at::Device& device() const { return parts_.device; }
  at::ScalarType dtype() const { return parts_.dtype; }
  /// One optimizer step of grad_accum micro-batches at `step` (the LR schedule's and the noise's
  /// step), reading the data stream at the state's cursor; fit() runs it, and so does
  /// `mixdiff bench train`, which asks for `times`.
  StepResult run_step(int64_t step, StepTimes* times = nullptr);
  /// Per-layer routing telemetry since the last call (null for dense models), summed over ranks.
  nlohmann::json take_moe_stats();
  /// Makes the model's replicas agree and installs the parallel layout (fit() calls it; so does
  /// `mixdiff bench train`): rank 0's weights and routing state broadcast, world-summed routing
  /// statistics, under dist.expert_parallel N the routed experts sharded over the
  /// expert-parallel groups (their optimizer moments sliced to match), and under
  /// dist.shard_optimizer the AdamW moments sharded over the data-parallel ranks. Idempotent.
  void setup_parallel();
  /// Expert parallelism's costs since the last call, over `steps` steps and `seconds` of wall
  /// time, reduced over the ranks (collective; null without expert parallelism):
  /// a2a_s_per_step (mean over ranks; _max: the slowest), a2a_share (of the wall time),
  /// a2a_mb_per_step (sent by a rank, mean), rows_per_step_max / _mean (token rows the ranks'
  /// experts computed), borrowed_experts_per_step (least-loaded EP).
  nlohmann::json take_parallel_stats(int64_t steps, double seconds);
  /// Elements of AdamW moment state this rank keeps per moment: its parameters' count, or its
  /// owned pieces under dist.shard_optimizer.
  int64_t moment_elements() const;
  /// Peak resident memory (MiB) of every rank, in rank order (collective).
  std::vector<double> peak_rss_per_rank();

 private:
  void evaluate(nlohmann::json* metrics);
  /// run.json: sizes and accounting, with MoE layers counted at `measured` experts per token
  /// (empty: the planned counts).
  void write_run_info(const std::vector<double>& measured);
  std::string checkpoint();
  std::string write_checkpoint(bool replicas_identical);
  /// Expert parallelism: every sharded expert tensor (and its AdamW moments) swapped for its whole
  /// [E, ...] tensor gathered over the expert group (`whole`), or back to this rank's shard.
  void swap_expert_tensors(bool whole);
  void setup_expert_parallel();
  void setup_sharded_optimizer();
  StatReducer reducer() const;
  StatGatherer gatherer() const;
  int64_t world() const;
  bool is_main() const;
  void log(const std::string& line);
  void append_metrics(const nlohmann::json& m);

  TrainerParts parts_;
  std::shared_ptr<DataParallel> dp_;
  std::string run_dir_;
  std::string recipe_yaml_;
  TrainerState state_;
  at::Tensor val_seqs_;
  at::Tensor val_response_;  ///< prompt/response data: the held-out rows' response positions
  std::vector<std::shared_ptr<RoutingTelemetry>> telemetry_;  ///< one per MoE layer
  std::vector<std::string> domains_;  ///< the data's domain names (telemetry by domain)
  bool parallel_ready_ = false;
  std::unique_ptr<ExpertParallel> ep_;      ///< null without expert parallelism
  std::vector<at::Tensor> expert_params_;   ///< sharded (reduced over the replica group)
  std::vector<at::Tensor> replicated_params_;  ///< everything else (averaged over the world)
  std::vector<at::Tensor> expert_shards_;   ///< the shards while swap_expert_tensors(true) holds
  std::vector<at::Tensor> moment_shards_;  ///< exp_avg, exp_avg_sq per expert_params_ entry
  std::vector<int64_t> moment_steps_;
  /// dist.shard_optimizer: the replicated parameters' moments sharded over the world (all
  /// parameters without expert parallelism), and the expert shards' over their replica group.
  std::unique_ptr<ShardedAdamW> zero_, zero_experts_;
};

}  // namespace mixdiff
