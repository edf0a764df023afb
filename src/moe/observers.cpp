#include "moe/observers.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

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

double specialisation_score(const at::Tensor& counts_DE) {
  torch::NoGradGuard ng;
  auto n = counts_DE.to(torch::kCPU, torch::kFloat64);
  const double N = n.sum().item<double>();
  if (!(N > 0)) return std::nan("");
  auto p = n / N;
  auto pd = p.sum(1), pe = p.sum(0);
  auto nz_d = pd > 0;
  const double h_d = -(pd.masked_select(nz_d) * pd.masked_select(nz_d).log()).sum().item<double>();
  if (!(h_d > 1e-12)) return std::nan("");
  auto outer = pd.unsqueeze(1) * pe.unsqueeze(0);
  auto nz = p > 0;
  const double mi =
      (p.masked_select(nz) * (p.masked_select(nz) / outer.masked_select(nz)).log()).sum().item<double>();
  return std::clamp(mi / h_d, 0.0, 1.0);
}

std::array<double, 4> segment_consistency_sums(const at::Tensor& token_A, const at::Tensor& expert_A,
                                               const at::Tensor& gate_A, int64_t n_tokens,
                                               int64_t n_seq, int64_t n_expert, int64_t segment,
                                               double cache) {
  torch::NoGradGuard ng;
  const int64_t A = expert_A.numel();
  if (A == 0 || n_seq <= 0 || n_tokens <= 0) return {0, 0, 0, 0};
  const int64_t L = n_tokens / n_seq, per_seq = (L + segment - 1) / segment;
  auto tok = token_A.to(torch::kCPU), ex = expert_A.to(torch::kCPU);
  auto seq = tok.div(L, "floor");
  auto seg = seq * per_seq + (tok - seq * L).div(segment, "floor");
  const int64_t S = n_seq * per_seq;
  auto idx = seg * n_expert + ex;
  auto n_SE = torch::zeros({S * n_expert}, torch::kFloat64)
                  .index_add_(0, idx, torch::ones({A}, torch::kFloat64))
                  .view({S, n_expert});
  auto g_SE = torch::zeros({S * n_expert}, torch::kFloat64)
                  .index_add_(0, idx, gate_A.detach().abs().to(torch::kCPU, torch::kFloat64))
                  .view({S, n_expert});
  const int64_t k = std::clamp<int64_t>(
      std::llround(static_cast<double>(A) / static_cast<double>(n_tokens)), 1, n_expert);
  const int64_t c = std::clamp<int64_t>(std::llround(cache * static_cast<double>(k)), k, n_expert);
  return {std::get<0>(g_SE.topk(k, 1)).sum().item<double>(), g_SE.sum().item<double>(),
          std::get<0>(n_SE.topk(c, 1)).sum().item<double>(), static_cast<double>(A)};
}

RoutingStats::RoutingStats(int64_t n_expert, int64_t buckets, int64_t n_domains, int64_t segment,
                           double cache)
    : n_expert_(n_expert), buckets_(buckets), n_domains_(n_domains), segment_(segment),
      cache_(cache) {
  reset();
}

void RoutingStats::reset() {
  domain_counts_DE_ = torch::zeros({n_domains_, n_expert_}, torch::kFloat64);
  domain_bucket_NDE_ = torch::zeros({buckets_, n_domains_, n_expert_}, torch::kFloat64);
  srp_num_ = srp_den_ = sch_hit_ = sch_all_ = 0;
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
    if (n_domains_ > 0 && ctx.domain_T.defined()) {
      auto d_A = ctx.domain_T.to(torch::kCPU).index_select(0, tok_A);
      auto known = (d_A >= 0) & (d_A < n_domains_);
      auto d = d_A.masked_select(known), e = ex_A.masked_select(known);
      auto one = torch::ones({d.numel()}, torch::kFloat64);
      domain_counts_DE_.view({-1}).index_add_(0, d * n_expert_ + e, one);
      domain_bucket_NDE_.view({-1}).index_add_(
          0, (b_A.masked_select(known) * n_domains_ + d) * n_expert_ + e, one);
    }
  }
  if (ctx.n_seq > 0) {
    const auto s = segment_consistency_sums(tok_A, ex_A, kept_gate_A, T, ctx.n_seq, n_expert_,
                                            segment_, cache_);
    srp_num_ += s[0], srp_den_ += s[1], sch_hit_ += s[2], sch_all_ += s[3];
  }
}

void RoutingStats::reduce(const StatReducer& r) {
  if (!r) return;
  auto scalars = torch::tensor({tokens_, entropy_sum_, routed_, kept_, zero_gate_, srp_num_,
                                srp_den_, sch_hit_, sch_all_},
                               torch::kFloat64);
  auto packed = torch::cat({counts_E_, bucket_counts_NE_.reshape({-1}), bucket_tokens_N_,
                            per_token_hist_, domain_counts_DE_.reshape({-1}),
                            domain_bucket_NDE_.reshape({-1}), scalars});
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
  take(domain_counts_DE_);
  take(domain_bucket_NDE_);
  take(scalars);
  tokens_ = scalars[0].item<double>();
  entropy_sum_ = scalars[1].item<double>();
  routed_ = scalars[2].item<double>();
  kept_ = scalars[3].item<double>();
  zero_gate_ = scalars[4].item<double>();
  srp_num_ = scalars[5].item<double>();
  srp_den_ = scalars[6].item<double>();
  sch_hit_ = scalars[7].item<double>();
  sch_all_ = scalars[8].item<double>();
}

namespace {

nlohmann::json json_number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(); }

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
    if (n_domains_ > 0) e["specialisation"] = json_number(specialisation_score(domain_bucket_NDE_[b]));
    buckets.push_back(e);
  }
  j["by_mask_ratio"] = buckets;
  j["segment"] = {{"length", segment_}, {"cache", cache_}};
  j["segment_routing_best"] = srp_den_ > 0 ? nlohmann::json(srp_num_ / srp_den_) : nlohmann::json();
  j["segment_cache_best_hit"] =
      sch_all_ > 0 ? nlohmann::json(sch_hit_ / sch_all_) : nlohmann::json();
  if (n_domains_ > 0) {
    nlohmann::json by = nlohmann::json::array();
    for (int64_t d = 0; d < n_domains_; ++d) {
      auto row = domain_counts_DE_[d].contiguous();
      by.push_back(std::vector<double>(row.data_ptr<double>(), row.data_ptr<double>() + n_expert_));
    }
    j["by_domain"] = by;
    j["specialisation"] = json_number(specialisation_score(domain_counts_DE_));
  }
  return j;
}

// ---------------------------------------------------------------------------------------------

RoutingTelemetry::RoutingTelemetry(const MoeLayer& layer, int64_t n_domains)
    : layer_(layer),
      stats_(layer.options().n_expert, layer.options().stat_buckets, n_domains,
             layer.options().stat_segment, layer.options().stat_cache) {}

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
