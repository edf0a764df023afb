// `mixdiff bench moe-layer`: forward+backward time of one MoE layer against a dense SwiGLU of
// the same active FLOPs (d_ff = K * d_expert), for several expert counts E at fixed K and expert
// width, with the share of the layer's time spent outside the expert GEMMs (routing, sorting,
// gathering, combining; the router's own forward+backward is shown apart). All cases are built first, warmed up twice, then timed in interleaved
// rounds (dense, MoE E1, experts-only E1, MoE E2, ...) in one process; medians are reported and
// the JSON line carries every number.
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
#include "moe/experts.h"
#include "moe/moe_layer.h"
#include "nn/layers.h"

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
      layers[i]->take_stats();
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
