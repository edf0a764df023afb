// Expert parallelism's groups and token exchange (dist/expert_parallel.h): the layout's groups,
// and on 4 processes (2 data-parallel replicas x 2 expert-parallel ranks, Gloo on loopback) rows
// exchanged all-to-all inside each expert-parallel group with variable split sizes, the backward
// returning every gradient row to its sender, and the expert-replica groups reducing over the
// ranks that hold the same experts. The test binary spawns itself as the workers.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "core/compat.h"
#include "core/errors.h"
#include "core/process.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"
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
}

TEST(DistributedExpertParallel, FourRanksExchangeRowsInsideTheirExpertGroups) {
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
