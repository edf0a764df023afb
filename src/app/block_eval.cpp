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
//   caches              block_diffusion samplers only: `infer.decode.prompts` held-out prompts of
//                       `prompt_tokens` tokens decoded as one batch with every cache mode (none,
//                       prefix, dual; none and exact for block-causal models): tokens/s, tokens
//                       per forward and the share of generated tokens equal to cache: none's
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
#include "moe/observers.h"
#include "train/data_source.h"

namespace mixdiff {

namespace {

struct CacheRow {
  std::string cache;
  double tokens_per_s = 0, tokens_per_forward = 0, agreement = 0;
};

struct Measured {
  double nelbo = 0, infill = 0, unique = 0, bytes_per_token = 0, tokens_per_s = 0;
  double tokens_per_forward = 0, latency_per_block_ms = 0;
  std::vector<CacheRow> caches;
};

/// Decodes `prompts_BP` with every cache mode of the recipe's block_diffusion sampler.
std::vector<CacheRow> compare_caches(ModelBase& model, const GenerateSettings& g,
                                     const at::Tensor& prompts_BP, BlockRoutingPolicy* policy) {
  std::vector<CacheRow> rows;
  if (g.sampler_kind != "block_diffusion" || prompts_BP.numel() == 0) return rows;
  const bool block_causal = model.attention() == "block_causal";
  const std::vector<std::string> modes = block_causal ? std::vector<std::string>{"none", "exact"}
                                                      : std::vector<std::string>{"none", "prefix",
                                                                                 "dual"};
  at::Tensor reference;
  for (const auto& mode : modes) {
    auto sampler = g.variant("cache", mode == "exact" ? "auto" : mode);
    sampler->set_eos(-1);  // every row decodes all its tokens: agreement counts the same tokens
    if (policy) policy->reset();
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(g.seed));
    const auto t0 = std::chrono::steady_clock::now();
    SampleResult r = sampler->generate(model, prompts_BP, gen);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int64_t P = prompts_BP.size(1), G = sampler->gen_length();
    auto out = r.tokens_BL.narrow(1, P, G);
    if (!reference.defined()) reference = out;
    const double toks = static_cast<double>(prompts_BP.size(0) * G);
    rows.push_back({mode, toks / secs, toks / static_cast<double>(std::max<int64_t>(1, r.forwards)),
                    (out == reference).to(torch::kFloat64).mean().item<double>()});
  }
  return rows;
}

double bytes_per_expert(ModelBase& model) {
  auto layers = model.moe_layers();
  if (layers.empty()) return 0;
  const auto& o = layers.front()->options();
  return 3.0 * static_cast<double>(o.d_model * o.d_expert) * 4.0;  // fp32
}

/// Mean over layers of the distinct experts per block, and the total (layer, block) experts.
std::pair<double, double> take_unique(const std::vector<std::shared_ptr<UniqueExpertCounter>>& c) {
  double mean = 0, total = 0;
  for (const auto& counter : c) {
    auto u = counter->take();
    if (u.blocks > 0) mean += u.sum / static_cast<double>(u.blocks);
    total += u.sum;
  }
  return {c.empty() ? 0.0 : mean / static_cast<double>(c.size()), total};
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
                 const at::Tensor& prompt, const at::Tensor& decode_prompts) {
  Measured m;
  cfg.policy->reset();
  model.set_block_routing(cfg.policy, cfg.block_size);
  m.nelbo = validation_nelbo(model, val, s.eval_batch_size, s.eval_seed).nelbo;
  const auto moe_layers = model.moe_layers();
  const auto counters = observe_layers<UniqueExpertCounter>(moe_layers);
  cfg.policy->reset();
  auto [acc, decoded] = infill(model, windows, s.span, s.seed);
  m.infill = acc;
  auto [mean_unique, total] = take_unique(counters);
  unobserve_layers(moe_layers, counters);
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
  m.caches = compare_caches(model, g, decode_prompts, cfg.policy.get());
  model.set_block_routing(nullptr, 0);
  return m;
}

nlohmann::json to_json(const Measured& m) {
  nlohmann::json caches = nlohmann::json::array();
  for (const auto& c : m.caches) {
    caches.push_back({{"cache", c.cache},
                      {"tokens_per_s", c.tokens_per_s},
                      {"tokens_per_forward", c.tokens_per_forward},
                      {"agreement_with_none", c.agreement}});
  }
  return {{"caches", caches},
          {"val_nelbo", m.nelbo},
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
  ConfigNode d = infer.section("decode");
  s.decode_prompts = d.get<int64_t>("prompts", 4);
  s.decode_prompt_tokens = d.get<int64_t>("prompt_tokens", 16);
  if (s.decode_prompts < 0) d.fail("prompts", "expected >= 0 (0: no cache comparison)");
  if (s.decode_prompt_tokens <= 0) d.fail("prompt_tokens", "expected a positive number of tokens");
  return s;
}

nlohmann::json run_block_eval(ModelBase& model, DataSource& data, const BlockEvalSettings& s,
                              GenerateSettings& g, const Tokenizer& tok) {
  const bool dense = model.moe_layers().empty();
  if (dense && s.routing.policy->restricts()) {
    throw ConfigError("infer.block_routing: the model has no MoE layers to route by block");
  }
  at::Tensor decode_prompts;
  if (s.decode_prompts > 0) {
    auto w = data.val_sequences(s.decode_prompts);
    decode_prompts = w.narrow(1, 0, std::min<int64_t>(s.decode_prompt_tokens, w.size(1)))
                         .contiguous()
                         .to(module_device(model));
  }
  if (dense) {  // a dense model: only the decoding comparison of the cache modes
    const auto rows = compare_caches(model, g, decode_prompts, nullptr);
    Measured m;
    m.caches = rows;
    char line[256];
    std::cout << "decoding " << (decode_prompts.defined() ? decode_prompts.size(0) : 0)
              << " held-out prompts, each cache mode (agreement: share of tokens equal to cache "
                 "none's)\n";
    for (const auto& r : rows) {
      std::snprintf(line, sizeof(line), "  %-8s %12.1f tokens/s %8.2f tokens/forward %8.4f agreement\n",
                    r.cache.c_str(), r.tokens_per_s, r.tokens_per_forward, r.agreement);
      std::cout << line;
    }
    std::cout << std::flush;
    return {{"caches", to_json(m)["caches"]}};
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
  const Measured base = measure(model, token, val, windows, s, g, prompt, decode_prompts);
  const Measured pol = measure(model, s.routing, val, windows, s, g, prompt, decode_prompts);
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
  if (!base.caches.empty()) {
    std::cout << "decoding " << decode_prompts.size(0) << " held-out prompts of "
              << decode_prompts.size(1) << " tokens, each cache mode (agreement: share of tokens "
              << "equal to cache none's)\n";
    std::snprintf(line, sizeof(line), "  %-8s %12s %12s %10s   %12s %12s %10s\n", "cache",
                  "tokens/s", "tokens/fwd", "agreement", "tokens/s", "tokens/fwd", "agreement");
    std::cout << line;
    for (size_t i = 0; i < base.caches.size() && i < pol.caches.size(); ++i) {
      const auto& a = base.caches[i];
      const auto& b = pol.caches[i];
      std::snprintf(line, sizeof(line), "  %-8s %12.1f %12.2f %10.4f   %12.1f %12.2f %10.4f\n",
                    a.cache.c_str(), a.tokens_per_s, a.tokens_per_forward, a.agreement,
                    b.tokens_per_s, b.tokens_per_forward, b.agreement);
      std::cout << line;
    }
    std::cout << "  (left: token-level routing; right: block-routed)\n";
  }
  std::cout << std::flush;
  return j;
}

}  // namespace mixdiff
