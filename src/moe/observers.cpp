#include "moe/observers.h"

#include <torch/torch.h>

#include "moe/moe_layer.h"

namespace mixdiff {

std::pair<double, int64_t> unique_experts_per_block(const at::Tensor& block_T,
                                                    const at::Tensor& token_A,
                                                    const at::Tensor& expert_A, int64_t n_expert,
                                                    const at::Tensor& valid_T) {
  torch::NoGradGuard ng;
  auto blocks = valid_T.defined() ? block_T.masked_select(valid_T) : block_T;
  const int64_t n_blocks = std::get<0>(at::_unique(blocks)).size(0);
  if (expert_A.numel() == 0) return {0.0, n_blocks};
  auto pairs_A = block_T.index_select(0, token_A) * n_expert + expert_A;
  return {static_cast<double>(std::get<0>(at::_unique(pairs_A)).size(0)), n_blocks};
}

RoutingStats::RoutingStats(int64_t n_expert, int64_t buckets)
    : n_expert_(n_expert), buckets_(buckets) {
  reset();
}

void RoutingStats::reset() {
  counts_E_ = torch::zeros({n_expert_}, torch::kFloat64);
  bucket_counts_NE_ = torch::zeros({buckets_, n_expert_}, torch::kFloat64);
  bucket_tokens_N_ = torch::zeros({buckets_}, torch::kFloat64);
  per_token_hist_ = torch::zeros({9}, torch::kFloat64);
  tokens_ = entropy_sum_ = routed_ = kept_ = zero_gate_ = 0;
}

void RoutingStats::add(const RoutingDecision& d, const at::Tensor& kept_token_A,
                       const at::Tensor& kept_expert_A, const at::Tensor& kept_gate_A,
                       int64_t routed, const RoutingContext& ctx) {
  torch::NoGradGuard ng;
  const int64_t T = d.probs_TS.size(0);
  auto w_T = valid_weights(ctx.valid_T, T, d.probs_TS.device());
  const double tokens = w_T.sum().item<double>();
  tokens_ += tokens;
  routed_ += static_cast<double>(routed);
  kept_ += static_cast<double>(kept_expert_A.numel());
  auto ex_A = kept_expert_A.to(torch::kCPU);
  const auto tok_A = kept_token_A.to(torch::kCPU);
  const auto w64_T = w_T.to(torch::kCPU, torch::kFloat64);
  counts_E_ += torch::bincount(ex_A, {}, n_expert_).to(torch::kFloat64);
  auto per_tok_T = torch::bincount(tok_A, {}, T).clamp_max(8);
  per_token_hist_ += torch::bincount(per_tok_T, w64_T, 9);
  auto gate_sum_T = torch::zeros({T}, torch::kFloat64)
                        .index_add_(0, tok_A,
                                    kept_gate_A.detach().abs().to(torch::kCPU, torch::kFloat64));
  zero_gate_ +=
      ((per_tok_T > 0) & (gate_sum_T == 0)).to(torch::kFloat64).mul(w64_T).sum().item<double>();
  auto p_TS = d.probs_TS.detach();
  auto ent_T = -(p_TS * p_TS.clamp_min(1e-30).log()).sum(1);
  entropy_sum_ += (ent_T * w_T.to(ent_T.device())).sum().item<double>();
  if (ctx.mask_ratio_B.defined() && ctx.seq_T.defined()) {
    auto r_B = ctx.mask_ratio_B.to(torch::kCPU).to(torch::kFloat64);
    auto b_B =
        (r_B * static_cast<double>(buckets_)).floor().clamp(0, buckets_ - 1).to(torch::kLong);
    auto b_T = b_B.index_select(0, ctx.seq_T.to(torch::kCPU));
    bucket_tokens_N_.index_add_(0, b_T, w64_T);
    auto b_A = b_T.index_select(0, tok_A);
    auto flat = bucket_counts_NE_.view({-1});  // [N * E]
    flat.index_add_(0, b_A * n_expert_ + ex_A, torch::ones({ex_A.numel()}, torch::kFloat64));
  }
}

void RoutingStats::reduce(const StatReducer& r) {
  if (!r) return;
  auto scalars = torch::tensor({tokens_, entropy_sum_, routed_, kept_, zero_gate_}, torch::kFloat64);
  auto packed = torch::cat({counts_E_, bucket_counts_NE_.reshape({-1}), bucket_tokens_N_,
                            per_token_hist_, scalars});
  r(packed);
  int64_t off = 0;
  auto take = [&](at::Tensor& t) {
    t.copy_(packed.narrow(0, off, t.numel()).view_as(t));
    off += t.numel();
  };
  take(counts_E_);
  take(bucket_counts_NE_);
  take(bucket_tokens_N_);
  take(per_token_hist_);
  take(scalars);
  tokens_ = scalars[0].item<double>();
  entropy_sum_ = scalars[1].item<double>();
  routed_ = scalars[2].item<double>();
  kept_ = scalars[3].item<double>();
  zero_gate_ = scalars[4].item<double>();
}

namespace {

nlohmann::json load_summary(const at::Tensor& counts) {
  std::vector<double> c(counts.data_ptr<double>(), counts.data_ptr<double>() + counts.numel());
  nlohmann::json j;
  j["tokens_per_expert"] = c;
  const double mean = counts.mean().item<double>();
  if (mean > 0) {
    j["max_mean"] = counts.max().item<double>() / mean;
    j["cv"] = counts.std(/*unbiased=*/false).item<double>() / mean;
  } else {
    j["max_mean"] = nullptr;
    j["cv"] = nullptr;
  }
  j["dead"] = (counts == 0).sum().item<int64_t>();
  return j;
}

}  // namespace

nlohmann::json RoutingStats::to_json() const {
  nlohmann::json j = load_summary(counts_E_);
  j["tokens"] = tokens_;
  j["entropy"] = tokens_ > 0 ? entropy_sum_ / tokens_ : 0.0;
  j["dropped"] = routed_ > 0 ? 1.0 - kept_ / routed_ : 0.0;
  j["experts_per_token"] = tokens_ > 0 ? kept_ / tokens_ : 0.0;
  j["experts_per_token_hist"] = std::vector<double>(
      per_token_hist_.data_ptr<double>(), per_token_hist_.data_ptr<double>() + 9);
  j["unrouted"] = tokens_ > 0 ? per_token_hist_[0].item<double>() / tokens_ : 0.0;
  j["zero_gate"] = tokens_ > 0 ? zero_gate_ / tokens_ : 0.0;
  nlohmann::json buckets = nlohmann::json::array();
  for (int64_t b = 0; b < buckets_; ++b) {
    const double lo = static_cast<double>(b) / static_cast<double>(buckets_);
    const double hi = static_cast<double>(b + 1) / static_cast<double>(buckets_);
    nlohmann::json e = load_summary(bucket_counts_NE_[b].contiguous());
    e["mask_ratio"] = {lo, hi};
    e["tokens"] = bucket_tokens_N_[b].item<double>();
    buckets.push_back(e);
  }
  j["by_mask_ratio"] = buckets;
  return j;
}

// ---------------------------------------------------------------------------------------------

RoutingTelemetry::RoutingTelemetry(const MoeLayer& layer)
    : layer_(layer), stats_(layer.options().n_expert, layer.options().stat_buckets) {}

void RoutingTelemetry::on_forward(const RoutedForward& f) {
  if (f.updates_state) stats_.add(f.decision, f.token_A, f.expert_A, f.gate_A, f.routed, f.ctx);
}

nlohmann::json RoutingTelemetry::take(const StatReducer& reduce) {
  stats_.reduce(reduce);
  if (stats_.empty()) return nullptr;
  nlohmann::json j = stats_.to_json();
  j["global_lbl"] = layer_.last_global_lbl();
  if (layer_.iteration() >= 0) j["iteration"] = layer_.iteration();
  stats_.reset();
  return j;
}

void UniqueExpertCounter::on_forward(const RoutedForward& f) {
  if (!f.ctx.block_T.defined()) return;
  auto [sum, blocks] = unique_experts_per_block(f.ctx.block_T, f.token_A, f.expert_A,
                                                f.layer.options().n_expert, f.ctx.valid_T);
  total_.sum += sum;
  total_.blocks += blocks;
}

}  // namespace mixdiff
