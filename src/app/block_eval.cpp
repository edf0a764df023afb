// Block-routing evaluation (`mixdiff eval --ckpt RUN --set infer.block_routing.kind=dmoe`;
// algorithms.md 10.0): the same measurements under token-level routing and under the policy,
// side by side, with the policy's ratios to token-level.
//   val_nelbo           validation NELBO with routing blocks of block_size positions
//   infill_exact_match  held-out windows of `infill.context` tokens with a span of `infill.span`
//                       tokens masked at a seeded position, decoded one token per forward by
//                       confidence (context on both sides); a span counts when every token matches
//   unique_experts      distinct experts per routing block per forward, mean over MoE layers, during
//                       the infill decoding forwards (dMoE's counter: every token of the block)
//   expert_bytes_per_token  bytes of the distinct experts' weights those forwards read, per
//                       decoded token
//   generation          the recipe's sampler on the recipe's prompt: tokens/s, tokens per forward,
//                       latency per block
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <limits>

#include <nlohmann/json.hpp>

#include "app/app.h"
#include "core/errors.h"
#include "data/tokenizer.h"
#include "diffusion/diffusion.h"
#include "infer/sampler.h"
#include "moe/block_routing.h"
#include "moe/moe_layer.h"
#include "train/data_source.h"

namespace mixdiff {

namespace {

struct Measured {
  double nelbo = 0, infill = 0, unique = 0, bytes_per_token = 0, tokens_per_s = 0;
  double tokens_per_forward = 0, latency_per_block_ms = 0;
};

double bytes_per_expert(ModelBase& model) {
  auto layers = model.moe_layers();
  if (layers.empty()) return 0;
  const auto& o = layers.front()->options();
  return 3.0 * static_cast<double>(o.d_model * o.d_expert) * 4.0;  // fp32
}

void count_unique(ModelBase& model, bool on) {
  for (MoeLayer* l : model.moe_layers()) l->count_unique_experts(on);
}

/// Mean over layers of the distinct experts per block, and the total (layer, block) experts.
std::pair<double, double> take_unique(ModelBase& model) {
  double mean = 0, total = 0;
  const auto layers = model.moe_layers();
  for (MoeLayer* l : layers) {
    auto u = l->take_unique_experts();
    if (u.blocks > 0) mean += u.sum / static_cast<double>(u.blocks);
    total += u.sum;
  }
  return {layers.empty() ? 0.0 : mean / static_cast<double>(layers.size()), total};
}

/// Exact-match infill accuracy; returns (accuracy, decoded tokens).
std::pair<double, int64_t> infill(ModelBase& model, const at::Tensor& windows, int64_t span,
                                  uint64_t seed) {
  torch::NoGradGuard ng;
  model.eval();
  const int64_t N = windows.size(0), C = windows.size(1), mask = model.mask_id();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t lo = C / 4, hi = std::max(lo + 1, 3 * C / 4 - span);
  auto starts = torch::randint(lo, hi, {N}, gen);
  auto x = windows.clone();
  auto target = torch::empty({N, span}, torch::kLong);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t s = starts[n].item<int64_t>();
    target[n].copy_(windows[n].narrow(0, s, span));
    x[n].narrow(0, s, span).fill_(mask);
  }
  for (int64_t step = 0; step < span; ++step) {
    ModelInput in(x);
    in.step = step;
    auto logits = model.forward(in).logits.to(torch::kFloat64);  // [N, C, V]
    auto probs = torch::softmax(logits, -1);
    auto [conf, pred] = probs.max(-1);
    conf = conf.masked_fill(x != mask, -1.0);
    auto pos = conf.argmax(1);  // the most confident masked position of each row
    for (int64_t n = 0; n < N; ++n) {
      const int64_t p = pos[n].item<int64_t>();
      if (x[n][p].item<int64_t>() == mask) x[n][p] = pred[n][p];
    }
  }
  int64_t right = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t s = starts[n].item<int64_t>();
    right += torch::equal(x[n].narrow(0, s, span), target[n]) ? 1 : 0;
  }
  return {static_cast<double>(right) / static_cast<double>(N), N * span};
}

Measured measure(ModelBase& model, const BlockRoutingConfig& cfg, const at::Tensor& val,
                 const at::Tensor& windows, const BlockEvalSettings& s, GenerateSettings& g,
                 const at::Tensor& prompt) {
  Measured m;
  cfg.policy->reset();
  model.set_block_routing(cfg.policy, cfg.block_size);
  m.nelbo = validation_nelbo(model, val, s.eval_batch_size, s.eval_seed).nelbo;
  count_unique(model, true);
  cfg.policy->reset();
  auto [acc, decoded] = infill(model, windows, s.span, s.seed);
  m.infill = acc;
  auto [mean_unique, total] = take_unique(model);
  m.unique = mean_unique;
  m.bytes_per_token = total * bytes_per_expert(model) / static_cast<double>(decoded);
  cfg.policy->reset();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(g.seed));
  const auto t0 = std::chrono::steady_clock::now();
  SampleResult r = g.sampler->generate(model, prompt, gen);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double toks = static_cast<double>(prompt.size(0) * g.sampler->gen_length());
  m.tokens_per_s = toks / secs;
  m.tokens_per_forward = toks / static_cast<double>(std::max<int64_t>(1, r.forwards));
  const int64_t blocks = r.blocks > 0 ? r.blocks : 1;
  m.latency_per_block_ms = 1e3 * (r.decode_seconds > 0 ? r.decode_seconds : secs) /
                           static_cast<double>(blocks);
  count_unique(model, false);
  model.set_block_routing(nullptr, 0);
  return m;
}

nlohmann::json to_json(const Measured& m) {
  return {{"val_nelbo", m.nelbo},
          {"infill_exact_match", m.infill},
          {"unique_experts_per_forward", m.unique},
          {"expert_bytes_per_token", m.bytes_per_token},
          {"tokens_per_s", m.tokens_per_s},
          {"tokens_per_forward", m.tokens_per_forward},
          {"latency_per_block_ms", m.latency_per_block_ms}};
}

}  // namespace

BlockEvalSettings BlockEvalSettings::from(const ConfigNode& recipe) {
  BlockEvalSettings s;
  ConfigNode infer = recipe.section("infer");
  s.routing = BlockRoutingConfig::from(infer.section("block_routing"));
  ConfigNode f = infer.section("infill");
  s.samples = f.get<int64_t>("samples", 64);
  s.context = f.get<int64_t>("context", 64);
  s.span = f.get<int64_t>("span", 4);
  s.seed = static_cast<uint64_t>(f.get<int64_t>("seed", 7));
  if (s.samples <= 0) f.fail("samples", "expected a positive number of windows");
  if (s.span <= 0 || s.context < 4 * s.span) {
    f.fail("span", str("expected 1..context/4 (", s.context / 4, ") tokens"));
  }
  return s;
}

nlohmann::json run_block_eval(ModelBase& model, DataSource& data, const BlockEvalSettings& s,
                              GenerateSettings& g, const Tokenizer& tok) {
  if (model.moe_layers().empty()) {
    throw ConfigError("infer.block_routing: the model has no MoE layers to route by block");
  }
  auto val = data.val_sequences(s.eval_sequences);
  auto long_windows = data.val_sequences(s.samples);
  const int64_t C = std::min<int64_t>(s.context, long_windows.size(1));
  auto windows = long_windows.narrow(1, 0, C).contiguous();
  std::vector<int32_t> ids = tok.encode(g.prompt);
  auto prompt = torch::empty({1, static_cast<int64_t>(ids.size())}, torch::kLong);
  for (size_t i = 0; i < ids.size(); ++i) prompt[0][static_cast<int64_t>(i)] = ids[i];
  g.sampler->set_eos(tok.eos_id());
  BlockRoutingConfig token;
  token.kind = "token";
  token.block_size = s.routing.block_size;
  token.policy = block_routing_registry().create("token", "infer.block_routing.kind",
                                                 ConfigNode::from_string("{}", "token"));
  const Measured base = measure(model, token, val, windows, s, g, prompt);
  const Measured pol = measure(model, s.routing, val, windows, s, g, prompt);
  auto ratio = [](double a, double b) { return b != 0 ? a / b : 0.0; };
  nlohmann::json j = {
      {"policy", s.routing.policy->describe()},
      {"block_size", s.routing.block_size},
      {"token_level", to_json(base)},
      {"block_routed", to_json(pol)},
      {"ratios",
       {{"val_nelbo", ratio(pol.nelbo, base.nelbo)},
        {"infill_exact_match", ratio(pol.infill, base.infill)},
        {"unique_experts_per_forward", ratio(pol.unique, base.unique)},
        {"expert_bytes_per_token", ratio(pol.bytes_per_token, base.bytes_per_token)},
        {"tokens_per_s", ratio(pol.tokens_per_s, base.tokens_per_s)},
        {"latency_per_block_ms", ratio(pol.latency_per_block_ms, base.latency_per_block_ms)}}}};
  char line[256];
  std::cout << "block routing: " << s.routing.policy->describe() << ", blocks of "
            << s.routing.block_size << " positions\n";
  std::snprintf(line, sizeof(line), "  %-28s %14s %14s %8s\n", "", "token-level", "block-routed",
                "ratio");
  std::cout << line;
  auto row = [&](const char* name, double a, double b, int prec) {
    std::snprintf(line, sizeof(line), "  %-28s %14.*f %14.*f %8.3f\n", name, prec, a, prec, b,
                  ratio(b, a));
    std::cout << line;
  };
  row("val NELBO (nats/token)", base.nelbo, pol.nelbo, 4);
  row("infill exact match", base.infill, pol.infill, 3);
  row("unique experts / forward", base.unique, pol.unique, 2);
  row("expert MB / decoded token", base.bytes_per_token / 1e6, pol.bytes_per_token / 1e6, 3);
  row("generation tokens/s", base.tokens_per_s, pol.tokens_per_s, 1);
  row("tokens per forward", base.tokens_per_forward, pol.tokens_per_forward, 2);
  row("latency per block (ms)", base.latency_per_block_ms, pol.latency_per_block_ms, 1);
  std::cout << std::flush;
  return j;
}

}  // namespace mixdiff
