// Benchmarks, measured side by side in one process (README, "Benchmarks").
//
// `mixdiff bench moe-layer`: forward+backward time of one MoE layer against a dense SwiGLU of
// the same active FLOPs (d_ff = K * d_expert), for several expert counts E at fixed K and expert
// width, with the share of the layer's time spent outside the expert GEMMs (routing, sorting,
// gathering, combining; the router's own forward+backward is shown apart). All cases are built first, warmed up twice, then timed in interleaved
// rounds (dense, MoE E1, experts-only E1, MoE E2, ...) in one process; medians are reported and
// the JSON line carries every number.
#include <sys/resource.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "app/app.h"
#include "core/compat.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/fs.h"
#include "core/profile.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"
#include "infer/sampler.h"
#include "moe/experts.h"
#include "moe/moe_layer.h"
#include "moe/observers.h"
#include "nn/layers.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mixdiff {

namespace {

double seconds(const std::function<void()>& fn) {
  const auto a = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void zero_grads(torch::nn::Module& m) {
  for (auto& p : m.parameters()) p.mutable_grad() = at::Tensor();
}

}  // namespace

int cmd_bench_moe_layer(const BenchMoeArgs& a) {
  if (a.tokens <= 0 || a.d_model <= 0 || a.d_expert <= 0 || a.top_k <= 0 || a.repeats <= 0) {
    throw ConfigError("bench moe-layer: --tokens, --d-model, --d-expert, --top-k and --repeats "
                      "must be positive");
  }
  for (int64_t e : a.experts) {
    if (e < a.top_k) {
      throw ConfigError(str("bench moe-layer: --experts ", e, " is below --top-k ", a.top_k));
    }
  }
  torch::set_num_threads(a.threads);
  torch::manual_seed(0);
  const int64_t T = a.tokens, D = a.d_model, F = a.d_expert, K = a.top_k;
  auto x = torch::randn({T, D}).requires_grad_(true);
  auto dy = torch::randn({T, D});

  SwiGLU dense(D, K * F);
  for (auto& p : dense.parameters()) {
    torch::NoGradGuard ng;
    p.normal_(0.0, 0.02);
  }
  // Every case is a closure; the repeats interleave them (dense, E1, E2, ...) so that drift of
  // the machine's speed hits all of them alike.
  std::vector<std::function<void()>> cases;
  cases.push_back([&] {
    zero_grads(dense);
    dense.forward(x).backward(dy);
  });
  std::vector<std::shared_ptr<MoeLayer>> layers;
  std::vector<std::shared_ptr<RoutingTelemetry>> telemetry;  // as the trainer attaches it
  std::vector<at::Tensor> xs_sorted, dys_sorted;
  std::vector<std::vector<int64_t>> counts_of;
  for (int64_t E : a.experts) {
    ConfigNode moe = ConfigNode::from_string(
        str("{n_expert: ", E, ", d_expert: ", F, ", dispatch: ", a.dispatch, "}"), "bench");
    ConfigNode rc = ConfigNode::from_string(str("{kind: token_choice, top_k: ", K, "}"), "bench");
    auto layer = std::make_shared<MoeLayer>(
        MoeOptions::from(moe, D), routers_registry().create("token_choice", "bench", rc,
                                                            RouterDims{D, E}));
    for (auto& p : layer->parameters()) {
      torch::NoGradGuard ng;
      p.normal_(0.0, 0.02);
    }
    layer->train();
    telemetry.push_back(observe_layers<RoutingTelemetry>(std::vector<MoeLayer*>{layer.get()})[0]);
    layers.push_back(layer);
    // The expert GEMMs alone, on the same routing (rows already grouped by expert).
    RoutingDecision d = layer->router().route(x.detach(), RoutingContext{});
    auto order = std::get<1>(d.expert_A.sort(true, 0, false));
    xs_sorted.push_back(
        x.detach().index_select(0, d.token_A.index_select(0, order)).requires_grad_(true));
    dys_sorted.push_back(torch::randn({xs_sorted.back().size(0), D}));
    auto cnt = torch::bincount(d.expert_A, {}, E);
    counts_of.emplace_back(cnt.data_ptr<int64_t>(), cnt.data_ptr<int64_t>() + E);
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    cases.push_back([&, i] {
      zero_grads(*layers[i]);
      layers[i]->forward(x.view({1, T, D}), nullptr).backward(dy.view({1, T, D}));
      telemetry[i]->take();
    });
    cases.push_back([&, i] {
      zero_grads(*layers[i]);
      RoutingDecision d = layers[i]->router().route(x, RoutingContext{});
      (d.gate_A.sum() + d.probs_TS.sum()).backward();
    });
    cases.push_back([&, i] {
      zero_grads(*layers[i]);
      const auto& pool = layers[i]->pool();
      grouped_swiglu(xs_sorted[i], counts_of[i], pool.w_gate(), pool.w_up(), pool.w_down())
          .backward(dys_sorted[i]);
    });
  }
  for (int w = 0; w < 2; ++w) {
    for (auto& c : cases) c();
  }
  std::vector<std::vector<double>> times(cases.size());
  for (int r = 0; r < a.repeats; ++r) {
    for (size_t c = 0; c < cases.size(); ++c) times[c].push_back(seconds(cases[c]));
  }
  const double t_dense = median(times[0]);
  const double flops = 6.0 * 3.0 * static_cast<double>(T * D * K * F);  // fwd + bwd, 3 GEMMs

  std::ostringstream tbl;
  char line[256];
  std::snprintf(line, sizeof(line), "%-8s %10s %10s %12s %12s %12s %14s\n", "E", "ms",
                "vs dense", "experts ms", "router ms", "other ms", "other share");
  tbl << line;
  std::snprintf(line, sizeof(line), "%-8s %10.2f %10s %12s %12s %12s %14s\n", "dense",
                t_dense * 1e3, "1.00x", "-", "-", "-", "-");
  tbl << line;
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < layers.size(); ++i) {
    const int64_t E = a.experts[i];
    const double t_layer = median(times[1 + 3 * i]), t_route = median(times[2 + 3 * i]),
                 t_exp = median(times[3 + 3 * i]);
    const double other = std::max(0.0, t_layer - t_exp);
    std::snprintf(line, sizeof(line), "%-8lld %10.2f %9.2fx %12.2f %12.2f %12.2f %13.1f%%\n",
                  static_cast<long long>(E), t_layer * 1e3, t_layer / t_dense, t_exp * 1e3,
                  t_route * 1e3, other * 1e3, 100.0 * other / t_layer);
    tbl << line;
    rows.push_back({{"n_expert", E},
                    {"layer_s", t_layer},
                    {"vs_dense", t_layer / t_dense},
                    {"experts_s", t_exp},
                    {"router_s", t_route},
                    {"routing_dispatch_s", other},
                    {"routing_dispatch_share", other / t_layer}});
  }
  nlohmann::json j = {{"bench", "moe-layer"},
                      {"tokens", T},
                      {"d_model", D},
                      {"d_expert", F},
                      {"top_k", K},
                      {"dispatch", a.dispatch},
                      {"threads", a.threads},
                      {"repeats", a.repeats},
                      {"dense_s", t_dense},
                      {"dense_gflops", flops / t_dense / 1e9},
                      {"moe", rows},
                      {"torch", compat::torch_version()}};
  std::cout << "moe-layer forward+backward: T=" << T << " tokens, d_model " << D << ", top-" << K
            << " of E experts of width " << F << " vs dense SwiGLU d_ff " << K * F << " ("
            << static_cast<int64_t>(flops / t_dense / 1e9) << " GFLOP/s), median of " << a.repeats
            << "\n"
            << tbl.str() << j.dump() << std::endl;
  if (!a.json.empty()) write_file_atomic(a.json, j.dump(2) + "\n");
  return 0;
}

}  // namespace mixdiff

// ---------------------------------------------------------------------------------------------
// `mixdiff bench train` / `mixdiff bench generate`: throughput of the training step and of
// generation, peak memory, and model FLOPs utilisation against this machine's measured matmul
// peak. The training bench feeds random tokens of the recipe's shape through Trainer::run_step, the
// step training runs (forward, loss terms, routing losses, backward, clipping, AdamW), so its numbers
// compare with the PyTorch reference's (tools/reference/mixdiff_ref.py, same workload).

namespace mixdiff {

namespace {

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

/// GFLOP/s of a 1024^3 fp32 matmul (median of 5), the "peak" that MFU is measured against.
/// Measured GEMM peak of this device and dtype (the MFU denominator): 1024^3 on the CPU,
/// 8192^3 on a GPU, best of the timed repeats after warm-up.
double matmul_peak_gflops(const at::Device& device = at::kCPU, at::ScalarType dtype = at::kFloat) {
  torch::NoGradGuard ng;
  const int64_t n = device.is_cuda() ? 8192 : 1024;
  auto o = torch::TensorOptions().device(device).dtype(dtype);
  auto a = torch::randn({n, n}, o), b = torch::randn({n, n}, o);
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    const double s = seconds([&] {
      auto c = torch::mm(a, b);
      compat::synchronize(device);
    });
    if (i >= 2) t.push_back(s);
  }
  return 2.0 * static_cast<double>(n * n * n) / *std::min_element(t.begin(), t.end()) / 1e9;
}

}  // namespace

/// Uniform random tokens of the recipe's shape in place of its corpus: throughput does not
/// depend on the text, and the bench runs where no corpus was prepared (a GPU machine).
class RandomTokens final : public DataSource {
 public:
  RandomTokens(int64_t vocab, int64_t seq_len) : vocab_(vocab), seq_len_(seq_len) {}
  int64_t seq_len() const override { return seq_len_; }
  int64_t vocab_size() const override { return vocab_; }
  int64_t eos_id() const override { return vocab_ - 1; }
  std::string tokenizer_dir() const override { return ""; }
  at::Tensor train_batch(int64_t first, int64_t count) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(first) + 1);
    return torch::randint(0, vocab_, {count, seq_len_}, gen);
  }
  at::Tensor val_sequences(int64_t n) override { return train_batch(-1, n); }
  std::string describe() const override {
    return str("random tokens (vocab ", vocab_, ", seq_len ", seq_len_, ")");
  }

 private:
  int64_t vocab_, seq_len_;
};

int cmd_bench_train(const BenchTrainArgs& a) {
  ConfigNode recipe = ConfigNode::from_file(a.recipe);
  for (const auto& o : a.overrides) recipe.apply_override(o);
  ConfigNode mc = recipe.at("model");
  const int64_t vocab = mc.has("vocab_size") ? mc.get<int64_t>("vocab_size") : a.vocab;
  const int64_t L = recipe.at("data").get<int64_t>("seq_len");
  // Every step at the full sequence length (training truncates 1% of batches, LLaDA-style).
  if (recipe.has("diffusion") && recipe.at("diffusion").has("random_length_prob")) {
    recipe.at("diffusion").set<double>("random_length_prob", 0.0);
  }
  // The trainer's own parts and step (forward, loss terms, routing losses, backward, gradient
  // norm and clipping, LR schedule, optimizer, routing-state updates) on random tokens.
  TrainerParts parts = build_trainer_parts(recipe, std::make_unique<RandomTokens>(vocab, L));
  // Under a launcher (torchrun's variables) every rank steps its share of the global batch with
  // the recipe's parallel layout (data and expert parallelism); rank 0 prints the result.
  const DistEnv env = DistEnv::from_env();
  ParallelLayout(env.world, static_cast<int>(parts.options.expert_parallel), env.rank);
  if (env.world > 1) {
    parts.dp = std::make_shared<DataParallel>(env, parts.options.dist_timeout_s, parts.device);
  }
  Trainer trainer(std::move(parts), "", "");
  trainer.setup_parallel();
  ModelBase& model = trainer.model();
  model.train();
  const at::Device device = trainer.device();
  const at::ScalarType dtype = trainer.dtype();
  double fwd = 0, bwd = 0;
  int64_t timed = 0, tokens = 0;
  if (a.profile) profile::g_enabled = true;
  for (int64_t s = 0; s < a.warmup + a.steps; ++s) {
    if (s == a.warmup) {  // drop the warm-up's profile and exchange costs
      profile::take();
      trainer.take_parallel_stats(0, 0);
    }
    StepTimes t;
    const StepResult r = trainer.run_step(s, &t);
    if (r.nonfinite) throw InputError(str("bench train: non-finite loss at step ", s + 1));
    trainer.take_moe_stats();  // as fit() does at its logging steps (outside the timed step)
    if (s >= a.warmup) {
      fwd += t.forward;
      bwd += t.backward + t.optimizer;
      tokens += r.tokens;
      ++timed;
    }
  }
  profile::g_enabled = false;
  const double tokens_per_s = static_cast<double>(tokens) / (fwd + bwd);
  const double peak = matmul_peak_gflops(device, dtype);
  const double fpt = model.train_flops_per_token(L);
  nlohmann::json j = {{"impl", "mixdiff"},
                      {"what", "train"},
                      {"recipe", a.recipe},
                      {"tokens_per_s", tokens_per_s},
                      {"forward_s_per_step", fwd / static_cast<double>(timed)},
                      {"backward_optimizer_s_per_step", bwd / static_cast<double>(timed)},
                      {"train_flops_per_token", fpt},
                      {"matmul_peak_gflops", peak},
                      {"mfu", fpt * tokens_per_s / (peak * 1e9)},
                      {"peak_rss_mb", peak_rss_mb()},
                      {"world_size", env.world},
                      {"model_state_mib", [&] {
                         // This rank's fp32 weights, gradients and two AdamW moments (expert
                         // parallelism keeps a shard of the routed experts; a sharded optimizer
                         // keeps the moments of its pieces only).
                         double n = 0;
                         for (const auto& p : model.parameters()) n += static_cast<double>(p.numel());
                         return (n * 2.0 + static_cast<double>(trainer.moment_elements()) * 2.0) *
                                4.0 / (1 << 20);
                       }()},
                      {"device", device.str()},
                      {"dtype", dtype == at::kFloat ? "fp32" : "bf16"},
                      {"parameters", model.num_parameters()},
                      {"active_parameters", model.num_active_parameters()}};
  if (a.profile) {
    nlohmann::json p = nlohmann::json::object();
    for (const auto& [k, v] : profile::take()) p[k] = v / static_cast<double>(timed);
    j["profile_s_per_step"] = p;
  }
  if (env.world > 1) {
    // Per rank: peak memory, and under expert parallelism the all-to-all's time, bytes and the
    // rows each rank's experts computed (the step time above is rank 0's).
    j["peak_rss_mb_per_rank"] = trainer.peak_rss_per_rank();
    nlohmann::json ep = trainer.take_parallel_stats(timed, fwd + bwd);
    if (!ep.is_null()) j["ep"] = ep;
    if (env.rank != 0) return 0;
  }
  std::cout << j.dump() << std::endl;
  return 0;
}

int cmd_bench_generate(const BenchGenerateArgs& a) {
  const std::string ckpt = resolve_checkpoint(a.ckpt);
  verify_checkpoint(ckpt);
  ConfigNode recipe = ConfigNode::from_file(ckpt + "/recipe.yaml");
  for (const auto& o : a.overrides) recipe.apply_override(o);
  torch::set_num_threads(static_cast<int>(recipe.section("runtime").get<int64_t>("threads", 1)));
  auto model = build_model(recipe.at("model"));
  load_model_weights(*model, ckpt + "/model.safetensors");
  const at::Device device = parse_device(recipe.section("runtime"));
  model->to(device);
  model->eval();
  GenerateSettings g = GenerateSettings::from(recipe);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  auto prompt = torch::randint(0, model->vocab_size(), {1, a.prompt_len}, gen).to(device);
  std::vector<double> t;
  SampleResult r;
  for (int i = 0; i <= a.repeats; ++i) {
    if (i == 1 && a.profile) {  // the first run warms up
      profile::take();
      profile::g_enabled = true;
    }
    const double s = seconds([&] {
      r = g.sampler->generate(*model, prompt, gen);
      compat::synchronize(device);
    });
    if (i > 0) t.push_back(s);
  }
  profile::g_enabled = false;
  const double G = static_cast<double>(g.sampler->gen_length());
  nlohmann::json j = {{"impl", "mixdiff"},
                      {"what", "generate"},
                      {"checkpoint", ckpt},
                      {"tokens_per_s", G / median(t)},
                      {"forwards_per_token", static_cast<double>(r.forwards) / G},
                      {"peak_rss_mb", peak_rss_mb()}};
  if (a.profile) {
    nlohmann::json p;
    const double n = static_cast<double>(a.repeats) * static_cast<double>(r.forwards);
    for (const auto& [k, v] : profile::take()) p[k] = v / n;
    j["profile_s_per_forward"] = p;
    j["s_per_forward"] = median(t) / static_cast<double>(r.forwards);
  }
  std::cout << j.dump() << std::endl;
  return 0;
}

}  // namespace mixdiff
