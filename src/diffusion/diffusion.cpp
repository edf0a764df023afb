#include "diffusion/diffusion.h"

#include "core/fault.h"
#include "core/signals.h"

#include <torch/torch.h>

#include <cmath>

namespace mixdiff {

ScheduleRegistry& schedules_registry() {
  static ScheduleRegistry r("schedules", "masked-diffusion noise schedules (diffusion.schedule)");
  return r;
}


at::Tensor sample_t(int64_t B, const NoiseSchedule& s, at::Generator& gen) {
  at::Tensor u;
  if (s.stratified) {
    u = (torch::arange(B, torch::kFloat32) + torch::rand({1}, gen)) / static_cast<double>(B);
  } else {
    u = torch::rand({B}, gen);
  }
  return u * (s.t_max - s.t_min) + s.t_min;
}

DiffusionBatch training_noise(const at::Tensor& x0, const NoiseSchedule& s, int64_t mask_id,
                              at::Generator& gen, int64_t W, int64_t r, int64_t block,
                              const at::Tensor& maskable) {
  const int64_t B = x0.size(0), Lb = x0.size(1);
  if (block <= 0) {
    auto t = sample_t(W * B, s, gen);
    auto u = torch::rand({W * B, Lb}, gen);
    return corrupt_with(x0, t.narrow(0, r * B, B), u.narrow(0, r * B, B), s, mask_id, maskable);
  }
  const int64_t nb = (Lb + block - 1) / block;
  auto t = sample_t(W * B * nb, s, gen).view({W * B, nb});
  auto u = torch::rand({W * B, Lb}, gen);
  auto t_BL = t.narrow(0, r * B, B).repeat_interleave(block, 1).narrow(1, 0, Lb).contiguous();
  DiffusionBatch batch = corrupt_per_token(x0, t_BL, u.narrow(0, r * B, B), s, mask_id, maskable);
  // The noisy half's masked positions within the [x_t ; x_0] input of length 2 Lb.
  const auto row = batch.index_M.div(Lb, "floor");
  batch.index_M = row * (2 * Lb) + (batch.index_M - row * Lb);
  return batch;
}

DiffusionBatch corrupt(const at::Tensor& x0_BL, const at::Tensor& t_B, const NoiseSchedule& s,
                       int64_t mask_id, at::Generator& gen) {
  // Drawn on the host generator (the same draws on every device), then used where x0 lives.
  return corrupt_with(x0_BL, t_B, torch::rand({x0_BL.size(0), x0_BL.size(1)}, gen), s, mask_id);
}

namespace {

// Restricts a batch's mask to `maskable` (SFT's response positions) and records the rows'
// response lengths; then the masked positions' indices, targets and rows.
void finish_mask(DiffusionBatch& b, const at::Tensor& maskable_in) {
  if (maskable_in.defined()) {
    TORCH_CHECK(maskable_in.sizes() == b.x0_BL.sizes(),
                "[corrupt] expected maskable_BL of x0_BL's shape ", b.x0_BL.sizes(), ", got ",
                maskable_in.sizes());
    const at::Tensor maskable = maskable_in.to(b.x0_BL.device(), torch::kBool);
    b.masked_BL = b.masked_BL & maskable;
    b.response_len_B = maskable.sum(1).to(torch::kFloat32);
  }
  const int64_t L = b.x0_BL.size(1);
  b.index_M = b.masked_BL.reshape({-1}).nonzero().squeeze(1);
  b.target_M = b.x0_BL.reshape({-1}).index_select(0, b.index_M);
  b.row_M = b.index_M.div(L, "floor");
}

}  // namespace

DiffusionBatch corrupt_per_token(const at::Tensor& x0_BL, const at::Tensor& t_BL_in,
                                 const at::Tensor& u_BL_in, const NoiseSchedule& s,
                                 int64_t mask_id, const at::Tensor& maskable) {
  TORCH_CHECK(t_BL_in.sizes() == x0_BL.sizes() && u_BL_in.sizes() == x0_BL.sizes(),
              "[corrupt_per_token] expected x0_BL, t_BL and u_BL of one shape");
  // Times and uniforms are drawn on a host generator; the batch lives where x0 does.
  const at::Tensor t_BL = t_BL_in.to(x0_BL.device()), u_BL = u_BL_in.to(x0_BL.device());
  const int64_t B = x0_BL.size(0), L = x0_BL.size(1);
  DiffusionBatch b;
  b.x0_BL = x0_BL;
  b.t_BL = t_BL;
  b.t_B = t_BL.mean(1);
  auto p_BL = s.mask_prob(t_BL.reshape({-1})).view({B, L});
  b.p_B = p_BL.mean(1);
  b.masked_BL = u_BL < p_BL;
  finish_mask(b, maskable);
  b.xt_BL = x0_BL.masked_fill(b.masked_BL, mask_id);
  b.weight_M = s.elbo_weight(t_BL.reshape({-1})).index_select(0, b.index_M);
  b.n_slots = B * L;
  return b;
}

DiffusionBatch corrupt_with(const at::Tensor& x0_BL, const at::Tensor& t_B_in,
                            const at::Tensor& u_BL_in, const NoiseSchedule& s, int64_t mask_id,
                            const at::Tensor& maskable) {
  TORCH_CHECK(x0_BL.dim() == 2 && t_B_in.dim() == 1 && t_B_in.size(0) == x0_BL.size(0) &&
                  u_BL_in.sizes() == x0_BL.sizes(),
              "[corrupt] expected x0_BL [B, L], t_B [B] and u_BL [B, L], got ", x0_BL.sizes(),
              ", ", t_B_in.sizes(), " and ", u_BL_in.sizes());
  // Times and uniforms are drawn on a host generator; the batch lives where x0 does.
  const at::Tensor t_B = t_B_in.to(x0_BL.device()), u_BL = u_BL_in.to(x0_BL.device());
  const int64_t B = x0_BL.size(0), L = x0_BL.size(1);
  DiffusionBatch b;
  b.x0_BL = x0_BL;
  b.t_B = t_B;
  b.p_B = s.mask_prob(t_B);
  b.masked_BL = u_BL < b.p_B.unsqueeze(1);
  finish_mask(b, maskable);
  b.xt_BL = x0_BL.masked_fill(b.masked_BL, mask_id);
  auto w_B = s.elbo_weight(t_B);
  b.weight_M = w_B.index_select(0, b.row_M);
  b.n_slots = B * L;
  return b;
}

at::Tensor masked_cross_entropy(const at::Tensor& logits_MV, const at::Tensor& target_M) {
  return torch::nn::functional::cross_entropy(
      logits_MV.to(torch::kFloat32), target_M.to(logits_MV.device()),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
}

NelboResult validation_nelbo(ModelBase& model, const at::Tensor& x0_NL, int64_t batch_size,
                             uint64_t seed, int shard, int n_shards,
                             const std::function<void(std::vector<double>&)>& sum_over_shards,
                             int64_t bd3_block, bool lockstep, int64_t draws, bool exact) {
  TORCH_CHECK(draws >= 1, "validation_nelbo: draws must be >= 1");
  TORCH_CHECK(!exact || bd3_block == 0, "validation_nelbo: exact masking is for masked diffusion");
  torch::NoGradGuard ng;
  const bool was_training = model.is_training();
  model.eval();
  const int64_t N = x0_NL.size(0), L = x0_NL.size(1), K = N * draws;
  // The draws below stay on the host generator (the same bound on every device); each batch's
  // tokens, mask, indices and weights are moved to the model's device.
  const at::Device dev = module_device(model);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  // Stratified t in (0, 1]: one draw per stratum [k/K, (k+1)/K) of the K (window, draw) items.
  // Masked diffusion: one t per item; block diffusion: one t per (item, block).
  const int64_t nb = bd3_block > 0 ? (L + bd3_block - 1) / bd3_block : 1;
  auto u = 1.0 - torch::rand({K * nb}, gen).to(torch::kFloat64);  // (0, 1]
  auto t_all = ((torch::arange(K * nb, torch::kFloat64) + u) / static_cast<double>(K * nb))
                   .view({K, nb});
  if (exact) t_all = (t_all * static_cast<double>(L)).ceil().clamp(1, L) / static_cast<double>(L);
  auto t_KL = bd3_block > 0 ? t_all.repeat_interleave(bd3_block, 1).narrow(1, 0, L).contiguous()
                            : t_all.expand({K, L}).contiguous();
  auto uu = torch::rand({K, L}, gen);
  if (exact) {
    // Exactly l = t L positions: those whose uniform ranks below l in their row (the mask test
    // below compares (rank + 0.5) / L with t = l / L).
    uu = (uu.argsort(/*dim=*/int64_t(1), /*descending=*/false)
              .argsort(/*dim=*/int64_t(1), /*descending=*/false)
              .to(torch::kFloat64) +
          0.5) /
         static_cast<double>(L);
  }
  const at::Tensor bias = bd3_block > 0 ? bd3_training_bias(L, bd3_block).to(dev) : at::Tensor();
  const at::Tensor pos = torch::arange(L, torch::TensorOptions().dtype(torch::kLong).device(dev));
  // Per item: the weighted cross-entropy of its masked tokens (the ranks fill their own items).
  std::vector<double> item(static_cast<size_t>(K), 0.0);
  const int64_t n_batches = (K + batch_size - 1) / batch_size;
  const int64_t rounds = (n_batches + n_shards - 1) / n_shards;
  for (int64_t round = 0; round < rounds; ++round) {
    int64_t bi = round * n_shards + shard;
    const bool idle = bi >= n_batches;  // only in lockstep: a forward whose result is dropped
    if (idle && !lockstep) break;
    if (idle) bi = 0;
    throw_if_interrupted();
    fault::delay("generate_delay_ms");
    const int64_t s = bi * batch_size;
    const int64_t n = std::min(batch_size, K - s);
    // Item k is window k mod N.
    auto x0 = (draws == 1 ? x0_NL.narrow(0, s, n)
                          : x0_NL.index_select(0, torch::arange(s, s + n, torch::kLong).remainder(N)))
                  .to(dev);
    auto t = t_KL.narrow(0, s, n);
    auto masked = (uu.narrow(0, s, n).to(torch::kFloat64) < t).to(dev);
    auto idx = masked.reshape({-1}).nonzero().squeeze(1);
    if (idx.numel() == 0 && !lockstep) continue;
    auto xt = x0.masked_fill(masked, model.mask_id());
    auto row = idx.div(L, "floor");
    at::Tensor logits;
    if (bd3_block > 0) {
      ModelInput in(torch::cat({xt, x0}, 1), row * (2 * L) + (idx - row * L));
      in.attn_bias = bias;
      in.positions_L = torch::cat({pos, pos});
      in.noisy_len = L;
      logits = model.forward(in).logits;
    } else {
      logits = model.forward(ModelInput(xt, idx)).logits;
    }
    auto ce = masked_cross_entropy(logits, x0.reshape({-1}).index_select(0, idx));
    auto w = (1.0 / t.reshape({-1})).to(dev).index_select(0, idx);
    if (idle) continue;
    auto per_row = torch::zeros({n}, torch::TensorOptions().dtype(torch::kFloat64).device(dev))
                       .index_add_(0, row, ce.to(torch::kFloat64) * w)
                       .cpu();
    const double* pr = per_row.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) item[static_cast<size_t>(s + i)] = pr[i];
  }
  if (sum_over_shards) sum_over_shards(item);
  double total = 0;
  for (double v : item) total += v;
  // Collapsed strata: item k sits in stratum k; strata (2j, 2j + 1) are paired.
  const int64_t pairs = K / 2;
  double ss = 0;
  for (int64_t j = 0; j < pairs; ++j) {
    const double d = (item[static_cast<size_t>(2 * j)] - item[static_cast<size_t>(2 * j + 1)]) /
                     static_cast<double>(L);
    ss += d * d;
  }
  // Unigram entropy of exactly these tokens: the NELBO of the best context-free predictor.
  auto counts = torch::bincount(x0_NL.reshape({-1})).to(torch::kFloat64);
  auto p = counts.masked_select(counts > 0) / static_cast<double>(N * L);
  NelboResult r;
  r.tokens = N * L;
  r.draws = draws;
  r.nelbo = total / static_cast<double>(K * L);
  r.se = pairs > 0 ? std::sqrt(static_cast<double>(K) / (2.0 * static_cast<double>(pairs)) * ss) /
                         static_cast<double>(K)
                   : 0.0;
  r.ppl_bound = std::exp(r.nelbo);
  r.unigram_entropy = -(p * p.log()).sum().item<double>();
  if (was_training) model.train();
  return r;
}

}  // namespace mixdiff
