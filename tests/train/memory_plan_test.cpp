// The memory plan (train/memory_plan.h): `mixdiff train` writes it before the first step, and
// its total is within 15% of the peak RSS the same process then reaches, for the dense and MoE
// quickstarts with and without activation checkpointing; checkpointing lowers the planned
// activations; `inspect --memory` prints the table.
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "data/prepare.h"
#include "support/support.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

TEST(E2EMemoryPlan, PlanIsWithin15PercentOfThePeakRssOfTheQuickstarts) {
  const std::string d = test::scratch_dir("memory_plan");
  const std::string data = d + "/data";
  {
    ConfigNode r = ConfigNode::from_file(test::source_dir() + "/recipes/quickstart.yaml");
    r.apply_override("data.path=" + data);
    std::ostringstream log;
    prepare_dataset(r.at("data"), /*force=*/false, log);
  }
  struct Case {
    std::string recipe, ac;
  };
  const std::vector<Case> cases = {{"quickstart", "none"},     {"quickstart", "blocks"},
                                   {"quickstart_moe", "none"}, {"quickstart_moe", "blocks"},
                                   {"quickstart_moe", "moe"}};
  std::map<std::string, double> activations;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.recipe + " " + c.ac);
    const std::string run = d + "/" + c.recipe + "_" + c.ac;
    auto res = test::run_mixdiff({"train", test::source_dir() + "/recipes/" + c.recipe + ".yaml",
                                  "--out", run, "--set", "data.path=" + data, "--set",
                                  "train.steps=4", "--set", "train.log_every=2", "--set",
                                  "train.ckpt_every=0", "--set", "eval.sequences=32", "--set",
                                  "eval.final_draws=1", "--set", "eval.every=0", "--set", "train.activation_checkpointing=" + c.ac});
    ASSERT_EQ(res.status, 0) << res.err;
    EXPECT_NE(res.out.find("memory plan per rank: "), std::string::npos) << res.out;
    const auto plan = nlohmann::json::parse(test::read_text(run + "/memory_plan.json"));
    ASSERT_TRUE(plan.at("probed").get<bool>());
    double peak_mb = 0;
    for (const auto& l : test::lines(test::read_text(run + "/metrics.jsonl"))) {
      auto j = nlohmann::json::parse(l);
      if (j.contains("peak_rss_mb")) peak_mb = j["peak_rss_mb"][0].get<double>();
    }
    ASSERT_GT(peak_mb, 0);
    const double planned_mb = plan.at("total_bytes").get<double>() / (1 << 20);
    std::cout << c.recipe << ", activation checkpointing " << c.ac << ": planned " << planned_mb
              << " MiB, peak RSS " << peak_mb << " MiB\n";
    EXPECT_LE(std::fabs(planned_mb - peak_mb) / peak_mb, 0.15)
        << "planned " << planned_mb << " MiB, peak RSS " << peak_mb << " MiB";
    double act = 0;
    for (double v : plan.at("block_activation_bytes_checkpointed").get<std::vector<double>>()) act += v;
    activations[c.recipe + " " + c.ac] = act;
  }
  // Recomputing every block keeps only the blocks' inputs.
  EXPECT_LT(activations["quickstart blocks"], 0.5 * activations["quickstart none"]);
  EXPECT_LT(activations["quickstart_moe blocks"], 0.5 * activations["quickstart_moe none"]);
  EXPECT_LT(activations["quickstart_moe moe"], activations["quickstart_moe none"]);
  EXPECT_GT(activations["quickstart_moe moe"], activations["quickstart_moe blocks"]);
}

TEST(E2EMemoryPlan, InspectMemoryPrintsThePlanForTheWorldSize) {
  const std::string& dir = test::tiny_dir("memory_inspect");
  auto res = test::run_mixdiff({"inspect", "--recipe", dir + "/recipe.yaml", "--memory", "--world",
                                "2", "--set", "dist.shard_optimizer=true", "--set",
                                "train.activation_checkpointing=blocks"});
  ASSERT_EQ(res.status, 0) << res.err;
  for (const char* w : {"memory plan per rank: 2 rank(s)", "shard_optimizer true",
                        "activation checkpointing blocks", "parameters", "optimizer state",
                        "communication buffers", "block 0:", "block 1:", "total"}) {
    EXPECT_NE(res.out.find(w), std::string::npos) << w << "\n" << res.out;
  }
  auto bad = test::run_mixdiff({"inspect", "--recipe", dir + "/recipe.yaml", "--memory", "--world",
                                "3", "--set", "dist.expert_parallel=2"});
  EXPECT_EQ(bad.status, 2) << bad.out;
}

}  // namespace
}  // namespace mixdiff
