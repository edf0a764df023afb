// Expert parallelism's groups and token exchange (dist/expert_parallel.h): the layout's groups,
// and on 4 processes (2 data-parallel replicas x 2 expert-parallel ranks, Gloo on loopback) rows
// exchanged all-to-all inside each expert-parallel group with variable split sizes, the backward
// returning every gradient row to its sender, the expert-replica groups reducing over the ranks
// that hold the same experts, and the all-to-all dispatcher equal to one process's sorted
// dispatcher over every expert (fp64), also in least-loaded mode on skewed routing. The test binary
// spawns itself as the workers; the least-loaded plan's properties are unit tests.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <cstdlib>
#include <thread>

#include "core/compat.h"
#include "core/errors.h"
#include "core/process.h"
#include "dist/all_to_all_dispatcher.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"
#include "dist/least_loaded.h"
#include "moe/dispatcher.h"
#include "moe/experts.h"
#include "moe/moe_layer.h"
#include "moe/router.h"
#include "moe/slot_map.h"
#include "core/config.h"
#include "support/support.h"

namespace mixdiff {
namespace {

TEST(UnitExpertParallel, LayoutGroupsFollowMegatronOrder) {
  const ParallelLayout l(8, 4, 6, /*n_expert=*/16);
  EXPECT_EQ(l.data_parallel(), 2);
  EXPECT_EQ(l.dp_rank(), 1);
  EXPECT_EQ(l.ep_rank(), 2);
  EXPECT_EQ(l.expert_group(), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(l.replica_group(), (std::vector<int>{2, 6}));
  EXPECT_EQ(ParallelLayout::first_expert(16, 4, 2), 8);
  const ParallelLayout one(3, 1, 2);
  EXPECT_EQ(one.expert_group(), (std::vector<int>{2}));
  EXPECT_EQ(one.replica_group(), (std::vector<int>{0, 1, 2}));
  EXPECT_THROW(ParallelLayout(6, 4, 0), ConfigError);      // 4 does not divide 6 ranks
  EXPECT_THROW(ParallelLayout(4, 2, 0, 9), ConfigError);   // nor 2 the 9 experts
  try {
    ParallelLayout(4, 2, 0, 9);
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("dist.expert_parallel"), std::string::npos);
  }
}

// Row k that global rank r sends to expert-group rank j: 1000 r + 10 j + k in every column.
at::Tensor rows_for(int r, int j, int64_t n) {
  auto v = torch::arange(n, torch::kDouble) + (1000.0 * r + 10.0 * j);
  return v.unsqueeze(1).expand({n, 3}).contiguous();
}

// Least-loaded plans (dist/least_loaded.h): nothing moves while the busiest rank is within the
// threshold; otherwise every expert's rows are placed exactly once, its owner first, no rank is
// busier than the busiest owner without the plan, none above the cap with min_chunk 1, and no
// moved piece has under m rows.
TEST(UnitExpertParallel, LeastLoadedPlansConserveRowsAndRespectTheCap) {
  LlepOptions o;
  o.threshold = 1.3;
  o.min_chunk = 1;
  EXPECT_FALSE(least_loaded_plan({10, 10, 12, 9}, 2, o).moves());  // 20 vs 21: balanced
  const LlepPlan skew = least_loaded_plan({100, 20, 5, 3, 2, 1, 1, 0}, 4, o);
  ASSERT_TRUE(skew.moves());
  EXPECT_EQ(skew.pieces.front().expert, 0);
  EXPECT_EQ(skew.pieces.front().rank, 0);  // the owner's piece first
  EXPECT_EQ(*std::max_element(skew.rank_rows.begin(), skew.rank_rows.end()), 33);  // ceil(132 / 4)
  std::mt19937 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    const int N = 1 << (trial % 3 + 1), per = 1 + trial % 4;
    std::vector<int64_t> load(static_cast<size_t>(N * per));
    for (auto& v : load) v = static_cast<int64_t>(rng() % 50);
    load[rng() % load.size()] += static_cast<int64_t>(rng() % 2000);  // one hot expert
    o.min_chunk = trial % 2 == 0 ? 1 : 16;
    o.capacity = trial % 5 == 0 ? 1.2 : 1.0;
    const LlepPlan p = least_loaded_plan(load, N, o);
    int64_t total = 0;
    for (int64_t v : load) total += v;
    const auto cap = static_cast<int64_t>(std::ceil(o.capacity * static_cast<double>(total) / N));
    std::vector<int64_t> placed(load.size(), 0), rows(static_cast<size_t>(N), 0);
    for (const auto& q : p.pieces) {
      placed[static_cast<size_t>(q.expert)] += q.count;
      rows[static_cast<size_t>(q.rank)] += q.count;
      if (q.rank != q.expert / per) {
        EXPECT_GE(q.count, std::min(o.min_chunk, load[q.expert]));
      }
    }
    if (!p.moves()) continue;
    EXPECT_EQ(placed, load) << "trial " << trial;
    EXPECT_EQ(rows, p.rank_rows) << "trial " << trial;
    const int64_t busiest = *std::max_element(rows.begin(), rows.end());
    int64_t plain = 0;  // the busiest owner without the plan
    for (int r = 0; r < N; ++r) {
      int64_t v = 0;
      for (int e = r * per; e < (r + 1) * per; ++e) v += load[static_cast<size_t>(e)];
      plain = std::max(plain, v);
    }
    EXPECT_LE(busiest, plain) << "trial " << trial;
    // Pieces of at least m rows can overshoot the cap by up to about m per piece; with m = 1 the
    // cap holds exactly.
    if (o.min_chunk == 1) {
      EXPECT_LE(busiest, cap) << "trial " << trial;
    }
  }
}

// What global rank r routes in the dispatcher check: T_r tokens, top-2 of E = 4 experts with
// random gates (rank 3 routes nothing, to cover a rank without assignments).
struct Routed {
  at::Tensor x_TD, token_A, expert_A, gate_A, c_TD;
};
Routed routed_on(int r) {
  torch::manual_seed(100 + r);
  const int64_t T = r == 3 ? 3 : 5 + r, K = r == 3 ? 0 : 2;
  Routed o;
  o.x_TD = torch::randn({T, 8}, torch::kDouble);
  o.token_A = torch::arange(T, torch::kLong).repeat_interleave(K);
  o.expert_A = torch::stack({torch::randperm(4, torch::kLong).narrow(0, 0, K)}, 0)
                   .repeat({T, 1})
                   .reshape({T * K});
  o.expert_A = (o.expert_A + o.token_A) % 4;  // vary the experts by token
  o.gate_A = torch::rand({T * K}, torch::kDouble);
  o.c_TD = torch::randn({T, 8}, torch::kDouble);  // the loss is sum(y * c)
  return o;
}

// Skewed routing for least-loaded dispatch: every token's first choice is expert 0 and most
// second choices expert 1, both held by expert-parallel rank 0 (rank 3 again routes nothing).
Routed skewed_on(int r) {
  Routed o = routed_on(r);
  const int64_t T = o.x_TD.size(0), K = r == 3 ? 0 : 2;
  auto second = torch::where(torch::arange(T, torch::kLong) % 3 == 2,
                             torch::arange(T, torch::kLong) % 2 + 2, torch::ones({T}, torch::kLong));
  o.expert_A = torch::stack({torch::zeros({T}, torch::kLong), second}, 1).narrow(1, 0, K).reshape({T * K});
  return o;
}

std::shared_ptr<ExpertPool> full_pool() {
  torch::manual_seed(7);
  auto p = std::make_shared<ExpertPool>(4, 8, 6);
  p->to(torch::kDouble);
  torch::NoGradGuard ng;
  for (auto& w : p->parameters()) w.normal_(0.0, 0.3);
  return p;
}

// The all-to-all dispatcher on the expert group equals the sorted dispatcher of one process that
// holds every expert and routes every rank's tokens: outputs, input gradients and each expert's
// weight gradients (summed over the group's tokens).
// Least-loaded mode (`llep`, on skewed routing) computes the same, with rows moved off the
// overloaded rank: its rows fall to the plan's cap and the other rank borrows expert weights.
void check_all_to_all_dispatcher(const ParallelLayout& l, compat::Collectives& ep,
                                 Routed (*routing)(int) = routed_on,
                                 std::optional<LlepOptions> llep = std::nullopt) {
  const int64_t E_local = 2;
  auto full = full_pool();
  auto local = std::make_shared<ExpertPool>(E_local, 8, 6);
  local->to(torch::kDouble);
  {
    torch::NoGradGuard ng;
    auto fp = full->named_parameters();
    for (auto& kv : local->named_parameters()) {
      kv.value().copy_(fp[kv.key()].narrow(0, l.ep_rank() * E_local, E_local));
    }
  }
  ExchangeStats stats;
  const AllToAllDispatcher a2a(ep, 4, llep, &stats);
  Routed mine = routing(l.rank);
  auto x = mine.x_TD.clone().requires_grad_(true);
  auto y = a2a.run(*local, x, mine.token_A, mine.expert_A, mine.gate_A);
  (y * mine.c_TD).sum().backward();
  if (llep) {
    // The plan of the group's loads: rank 0 holds experts 0 and 1, which take most rows.
    std::vector<int64_t> load(4, 0);
    for (int r : l.expert_group()) {
      Routed o = routing(r);
      for (int64_t i = 0; i < o.expert_A.numel(); ++i) ++load[o.expert_A[i].item<int64_t>()];
    }
    const LlepPlan plan = least_loaded_plan(load, 2, *llep);
    ASSERT_TRUE(plan.moves());
    const int64_t plain_rows = l.ep_rank() == 0 ? load[0] + load[1] : load[2] + load[3];
    EXPECT_EQ(stats.rows, plan.rank_rows[static_cast<size_t>(l.ep_rank())]);
    if (l.ep_rank() == 0) {
      EXPECT_LT(stats.rows, plain_rows);
    }
    if (l.ep_rank() == 1) {
      EXPECT_GT(stats.weight_rows, 0);
    }
  }

  // One process: every member's tokens through the full pool.
  auto sorted = make_dispatcher("sorted");
  for (int r : l.expert_group()) {
    Routed o = routing(r);
    auto xr = o.x_TD.clone().requires_grad_(true);
    auto yr = sorted->run(*full, xr, o.token_A, o.expert_A, o.gate_A);
    if (yr.requires_grad()) (yr * o.c_TD).sum().backward();  // rank 3 routes nothing
    if (!xr.grad().defined()) xr.mutable_grad() = torch::zeros_like(xr);
    if (r == l.rank) {
      EXPECT_LT((y - yr).abs().max().item<double>(), 1e-12);
      ASSERT_TRUE(x.grad().defined());  // the exchanges ran backward on a rank with no rows too
      EXPECT_LT((x.grad() - xr.grad()).abs().max().item<double>(), 1e-12);
    }
  }
  auto fp = full->named_parameters();
  for (auto& kv : local->named_parameters()) {
    ASSERT_TRUE(kv.value().grad().defined()) << kv.key();
    auto want = fp[kv.key()].grad().narrow(0, l.ep_rank() * E_local, E_local);
    EXPECT_LT((kv.value().grad() - want).abs().max().item<double>(), 1e-12) << kv.key();
  }
}

std::shared_ptr<MoeLayer> tiny_moe_layer() {
  torch::manual_seed(11);
  ConfigNode moe = ConfigNode::from_string("{n_expert: 4, d_expert: 6}", "moe.yaml");
  ConfigNode router = ConfigNode::from_string("{kind: token_choice, top_k: 2}", "router.yaml");
  auto r = routers_registry().create("token_choice", "kind", router, RouterDims{8, 4});
  auto l = std::make_shared<MoeLayer>(MoeOptions::from(moe, 8), r);
  torch::NoGradGuard ng;
  for (auto& p : l->parameters()) p.normal_(0.0, 0.3);
  return l;
}

at::Tensor tokens_of(int r) {
  torch::manual_seed(200 + r);
  return torch::randn({2, 3, 8});
}

// A MoE layer sharded by ExpertParallel, gradients reduced as the trainer will (router over the
// world, experts over their replicas), equals one process that averages the W ranks' losses.
void check_sharded_layer(DataParallel& dp, const ParallelLayout& l) {
  const double W = l.world;
  auto ref = tiny_moe_layer();
  at::Tensor ref_y;
  for (int r = 0; r < l.world; ++r) {
    auto y = ref->forward(tokens_of(r), nullptr);
    if (r == l.rank) ref_y = y.detach();
    (y.sum() / W).backward();
  }
  auto layer = tiny_moe_layer();
  ExpertParallel ep(dp, l);
  const std::vector<at::Tensor> experts = ep.shard({layer.get()});
  ASSERT_EQ(experts.size(), 3u);
  EXPECT_EQ(layer->pool().n_expert(), 2);
  EXPECT_EQ(layer->pool().first_expert(), 2 * l.ep_rank());
  auto y = layer->forward(tokens_of(l.rank), nullptr);
  EXPECT_LT((y - ref_y).abs().max().item<double>(), 1e-5);
  y.sum().backward();
  dp.average_gradients(layer->router().parameters(), 1 << 20);
  ep.reduce_expert_gradients(experts, 1 << 20);
  auto want = ref->named_parameters();
  for (auto& kv : layer->named_parameters()) {
    at::Tensor w = want[kv.key()].grad();
    if (kv.key().rfind("experts.", 0) == 0) w = w.narrow(0, 2 * l.ep_rank(), 2);
    ASSERT_TRUE(kv.value().grad().defined()) << kv.key();
    EXPECT_LT((kv.value().grad() - w).abs().max().item<double>(), 1e-5) << kv.key();
  }
  // Checkpoints gather whole expert tensors; the gradient norm sums the shards' squares.
  double sq = 0, want_sq = 0;
  for (auto& kv : layer->pool().named_parameters()) {
    EXPECT_TRUE(torch::equal(ep.gather(kv.value()), ref->pool().named_parameters()[kv.key()]))
        << kv.key();
    sq += kv.value().grad().pow(2).sum().item<double>();
    want_sq += ref->pool().named_parameters()[kv.key()].grad().pow(2).sum().item<double>();
  }
  EXPECT_NEAR(ep.sum_over_expert_group(sq), want_sq, 1e-5 * want_sq);
  // Refused: a layer whose experts live in a pool the model shares, and 3 experts over 2 ranks.
  ConfigNode moe = ConfigNode::from_string("{n_expert: 4, d_expert: 6}", "moe.yaml");
  ConfigNode router = ConfigNode::from_string("{kind: token_choice, top_k: 2}", "router.yaml");
  auto pool = std::make_shared<ExpertPool>(4, 8, 6);
  MoeLayer on_shared(MoeOptions::from(moe, 8),
                     routers_registry().create("token_choice", "kind", router, RouterDims{8, 4}),
                     std::make_shared<SlotMap>(pool));
  EXPECT_THROW(ep.shard({&on_shared}), ConfigError);
  ConfigNode moe3 = ConfigNode::from_string("{n_expert: 3, d_expert: 6}", "moe.yaml");
  MoeLayer three(MoeOptions::from(moe3, 8),
                 routers_registry().create("token_choice", "kind", router, RouterDims{8, 3}));
  EXPECT_THROW(ep.shard({&three}), ConfigError);
}

// The worker: runs only under the driver below (RANK etc. set, MIXDIFF_EP_WORKER=1).
TEST(DistributedExpertParallelWorker, ExchangesRowsAndReturnsTheirGradients) {
  if (!std::getenv("MIXDIFF_EP_WORKER")) GTEST_SKIP() << "a worker of the test below";
  const DistEnv env = DistEnv::from_env();
  DataParallel dp(env, 60);
  const ParallelLayout l(env.world, 2, env.rank);
  auto ep = dp.subgroup(l.expert_group(), "ep" + std::to_string(l.dp_rank()));
  auto rep = dp.subgroup(l.replica_group(), "rep" + std::to_string(l.ep_rank()));
  ASSERT_TRUE(ep && rep);
  ASSERT_EQ(ep->size(), 2);
  ASSERT_EQ(ep->rank(), l.ep_rank());
  const int me = l.ep_rank();
  // Variable splits: group rank g sends g + j + 1 rows to group rank j (none to itself on
  // replica 1, to cover an empty split).
  auto count = [&](int g, int j) -> int64_t {
    return l.dp_rank() == 1 && g == j ? 0 : g + j + 1;
  };
  std::vector<int64_t> send;
  std::vector<at::Tensor> parts;
  for (int j = 0; j < 2; ++j) {
    send.push_back(count(me, j));
    parts.push_back(rows_for(env.rank, j, send.back()));
  }
  const std::vector<int64_t> recv = exchange_counts(send, *ep);
  for (int j = 0; j < 2; ++j) EXPECT_EQ(recv[static_cast<size_t>(j)], count(j, me)) << j;

  auto x = torch::cat(parts).requires_grad_(true);
  auto y = exchange_rows(x, send, recv, *ep);
  std::vector<at::Tensor> want;
  for (int j = 0; j < 2; ++j) want.push_back(rows_for(l.expert_group()[j], me, count(j, me)));
  EXPECT_TRUE(torch::equal(y.detach(), torch::cat(want))) << y;
  // d/dx sum(y * y.detach()) sends each received row's value back to where it came from: x.
  (y * y.detach()).sum().backward();
  EXPECT_TRUE(torch::equal(x.grad(), x.detach())) << x.grad();

  // The expert-replica group sums over the ranks holding the same experts.
  std::vector<at::Tensor> v{torch::tensor({static_cast<double>(env.rank)})};
  rep->all_reduce_sum(v);
  double want_sum = 0;
  for (int r : l.replica_group()) want_sum += r;
  EXPECT_EQ(v[0].item<double>(), want_sum);

  check_all_to_all_dispatcher(l, *ep);
  LlepOptions eager;  // move rows as soon as a rank holds more than the mean
  eager.threshold = 1.0;
  eager.min_chunk = 1;
  check_all_to_all_dispatcher(l, *ep, skewed_on, eager);
  check_sharded_layer(dp, l);
}

TEST(DistributedExpertParallel, FourRanksExchangeRowsAndDispatchInsideTheirExpertGroups) {
  const std::string d = test::scratch_dir("expert_parallel");
  const int port = test::free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < 4; ++r) {
    auto env = inherited_environment({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                      "MASTER_ADDR", "MASTER_PORT"});
    env.push_back("RANK=" + std::to_string(r));
    env.push_back("WORLD_SIZE=4");
    env.push_back("MASTER_ADDR=127.0.0.1");
    env.push_back("MASTER_PORT=" + std::to_string(port));
    env.push_back("MIXDIFF_EP_WORKER=1");
    pids.push_back(spawn_self(
        "test", {"--gtest_filter=DistributedExpertParallelWorker.*"}, env,
        {d + "/out" + std::to_string(r), d + "/err" + std::to_string(r)}));
  }
  std::vector<int> code(4, -1);
  int ended = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (ended < 4 && std::chrono::steady_clock::now() < until) {
    if (auto e = poll_child()) {
      for (int r = 0; r < 4; ++r) {
        if (pids[static_cast<size_t>(r)] == e->pid) {
          code[static_cast<size_t>(r)] = e->code;
          ++ended;
        }
      }
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  if (ended < 4) signal_children(pids, SIGKILL);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(code[static_cast<size_t>(r)], 0)
        << "rank " << r << ":\n"
        << test::read_text(d + "/out" + std::to_string(r))
        << test::read_text(d + "/err" + std::to_string(r));
  }
}

}  // namespace
}  // namespace mixdiff
