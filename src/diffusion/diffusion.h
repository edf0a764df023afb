// Masked diffusion: noise schedules, the forward (masking) process, loss terms and the
// validation NELBO (LLaDA, arXiv 2502.09992; MDLM; algorithms.md sections 1.2 and 1.11).
//
// Forward process: per sequence b draw t_b ~ U[t_min, t_max], mask each token independently with
// probability p_b = schedule.mask_prob(t_b) (LLaDA's linear schedule: p = (1 - eps) t + eps).
// A loss term sees the masked positions only: their indices into the flattened [B*L] tokens, the
// clean targets, and the per-position ELBO weight of their sequence.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/registry.h"
#include "model/model.h"

namespace mixdiff {

/// Mask probability p(t) and ELBO weight w(t) of a masked-diffusion noise schedule.
class NoiseSchedule {
 public:
  virtual ~NoiseSchedule() = default;
  /// p(t) = 1 - alpha_t: probability that a token is masked at time t. t_B in [0, 1], fp32.
  virtual at::Tensor mask_prob(const at::Tensor& t_B) const = 0;
  /// Per-token weight of the masked cross-entropy in the ELBO (1/t for LLaDA's linear schedule).
  virtual at::Tensor elbo_weight(const at::Tensor& t_B) const = 0;
  /// Range of t drawn in training (clipped schedules draw from a sub-interval of [0, 1]).
  double t_min = 0.0, t_max = 1.0;
  /// Stratified ("antithetic", MDLM/BD3-LM) draws: the B sequences of a batch get one t from
  /// each of B equal strata, t_b = (b + u) / B for one u, which lowers the variance of the
  /// 1/t-weighted loss without changing its expectation. Off: independent t_b ~ U.
  bool stratified = false;
};

using ScheduleRegistry = Registry<std::shared_ptr<NoiseSchedule>, const ConfigNode&>;
ScheduleRegistry& schedules_registry();

/// A corrupted batch and everything the loss terms need.
struct DiffusionBatch {
  at::Tensor x0_BL;       ///< int64 clean tokens
  at::Tensor xt_BL;       ///< int64 tokens with [MASK] at masked positions
  at::Tensor masked_BL;   ///< bool
  at::Tensor t_B;         ///< fp32 diffusion time per sequence (block diffusion: the mean)
  at::Tensor t_BL;        ///< fp32 time of each position (block diffusion), else undefined
  at::Tensor p_B;         ///< fp32 mask probability per sequence
  at::Tensor index_M;     ///< int64 flattened positions (b * L + i) of masked tokens
  at::Tensor target_M;    ///< int64 clean tokens at those positions
  at::Tensor weight_M;    ///< fp32 ELBO weight of each masked position's sequence
  at::Tensor row_M;       ///< int64 sequence (row) of each masked position
  /// Prompt/response data (SFT): fp32 [B] number of maskable (response) positions per row, the
  /// normaliser of LLaDA's SFT loss; undefined when every position is maskable.
  at::Tensor response_len_B;
  int64_t n_slots = 0;    ///< B * L, the normaliser of LLaDA's pre-training loss
};

/// Draws masks for `t_B` from `gen` (uniforms, one per token) and fills a DiffusionBatch.
DiffusionBatch corrupt(const at::Tensor& x0_BL, const at::Tensor& t_B,
                       const NoiseSchedule& schedule, int64_t mask_id, at::Generator& gen);

/// The same with the mask uniforms given (u_BL in [0, 1)): a position is masked when
/// u < p(t). Data-parallel ranks draw the global batch's uniforms and take their rows.
/// `maskable_BL` (bool [B, L], optional): only these positions may be masked (SFT: the
/// response; the prompt stays clean, LLaDA's SFT forward process).
DiffusionBatch corrupt_with(const at::Tensor& x0_BL, const at::Tensor& t_B, const at::Tensor& u_BL,
                            const NoiseSchedule& schedule, int64_t mask_id,
                            const at::Tensor& maskable_BL = {});

/// With a diffusion time per token (block diffusion: one t per block): t_BL [B, L]. The ELBO
/// weight of a masked position is its own t's.
DiffusionBatch corrupt_per_token(const at::Tensor& x0_BL, const at::Tensor& t_BL,
                                 const at::Tensor& u_BL, const NoiseSchedule& schedule,
                                 int64_t mask_id, const at::Tensor& maskable_BL = {});

/// t_B ~ U[t_min, t_max] from `gen`, independent or stratified (NoiseSchedule::stratified).
at::Tensor sample_t(int64_t B, const NoiseSchedule& schedule, at::Generator& gen);

/// The training noise of one micro-batch of B rows on data-parallel rank `rank` of `world`: the
/// times and mask uniforms of the global batch of world x B rows are drawn from `gen` and this
/// rank takes its rows, so W ranks reproduce one process with batch W B.
///   block == 0: one t per sequence (LLaDA, MDLM).
///   block > 0:  BD3-LM, one t per (sequence, block of `block` positions), stratified over all
///               blocks of the global batch when the schedule is; index_M then addresses the
///               noisy half of the [x_t ; x_0] input of length 2 L.
/// `maskable_BL` (this rank's rows, optional): only those positions may be masked (SFT).
DiffusionBatch training_noise(const at::Tensor& x0_BL, const NoiseSchedule& schedule,
                              int64_t mask_id, at::Generator& gen, int64_t world = 1,
                              int64_t rank = 0, int64_t block = 0,
                              const at::Tensor& maskable_BL = {});

/// Result of the validation NELBO.
struct NelboResult {
  double nelbo = 0;            ///< nats per token (upper bound on -log p(x) / L)
  double ppl_bound = 0;        ///< exp(nelbo)
  double unigram_entropy = 0;  ///< nats per token of the same tokens (context-free baseline)
  /// Standard error of `nelbo` as a Monte-Carlo estimate (collapsed strata: adjacent strata
  /// paired, v = K / (2P) * sum_pairs (y_a - y_b)^2 / K^2 over the K (window, draw) items of P
  /// pairs; conservative, since a pair's difference also holds its two strata's and windows'
  /// differences).
  double se = 0;
  int64_t tokens = 0;  ///< windows x tokens per window (each drawn `draws` times)
  int64_t draws = 1;
};

/// Masked-diffusion NELBO per token of `x0_NL` under the continuous-time linear schedule:
/// t is stratified over the K = N x `draws` (window, draw) items (item k = d N + n, window n in
/// its draw d, has t_k = (k + u_k) / K, u_k ~ U(0, 1] from `seed`: every window is drawn at
/// `draws` ratios spread over (0, 1]), each token is masked with probability t_k and the masked
/// cross-entropy is weighted by 1/t_k. `draws` = 1 is one draw per window.
/// `exact`: the l-form of the same bound (LLaDA's evaluation, Eq. 13 of arXiv 2502.09992): item k
/// masks exactly l_k = ceil(s_k L) positions (s_k = (k + u_k) / K, the l smallest of the row's
/// uniforms) and weighs them L / l_k. Both forms have the same expectation (sum_l C(L,l)
/// B(l, L-l+1) = 1/l per l masked positions), but the l-form's terms are bounded (a masked
/// token's weight is at most L, not 1/t), so its variance is lower. Masked diffusion only.
/// Deterministic for a given seed; independent of the training schedule (the bound is
/// schedule-invariant) so runs with different schedules stay comparable.
/// Data-parallel evaluation: rank `shard` of `n_shards` evaluates every n_shards-th batch of the
/// same draws and `sum_over_shards` adds the ranks' per-item sums elementwise, so the result does
/// not depend on the number of ranks.
/// `bd3_block` > 0: the block-diffusion bound of a BD3-trained model, one t per block (stratified
/// over all blocks) and the [x_t ; x_0] forward with BD3's mask, each block conditioned on the
/// clean earlier blocks.
/// `lockstep`: every shard runs the same number of forwards (a shard short of batches, or with a
/// batch that masks nothing, runs batch 0 and discards it), as collectives inside the forward
/// need (expert parallelism's all-to-all).
NelboResult validation_nelbo(ModelBase& model, const at::Tensor& x0_NL, int64_t batch_size,
                             uint64_t seed, int shard = 0, int n_shards = 1,
                             const std::function<void(std::vector<double>&)>& sum_over_shards = {},
                             int64_t bd3_block = 0, bool lockstep = false, int64_t draws = 1,
                             bool exact = false);

/// Cross-entropy of `logits` [M, V] against `target` [M], per position (fp32).
at::Tensor masked_cross_entropy(const at::Tensor& logits_MV, const at::Tensor& target_M);

}  // namespace mixdiff
