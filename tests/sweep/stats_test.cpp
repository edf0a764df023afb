// Replicate statistics of sweeps: Student-t intervals and paired differences against hand
// computations, seeds grouped into configurations whatever the other axes, a missing seed shown,
// and the tables and report of a sweep folder made by hand (no training).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "report/report.h"
#include "report/stats.h"
#include "support/support.h"
#include "sweep/sweep.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;

TEST(UnitStats, StudentTQuantilesMatchTheTables) {
  // Two-sided 95% critical values (any statistics table).
  EXPECT_NEAR(student_t_quantile(0.975, 1), 12.7062047, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.975, 2), 4.3026527, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.975, 3), 3.1824463, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.975, 4), 2.7764451, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.975, 10), 2.2281389, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.975, 30), 2.0422725, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.995, 5), 4.0321430, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.025, 3), -3.1824463, 1e-6);
  EXPECT_NEAR(student_t_cdf(0, 7), 0.5, 1e-12);
  EXPECT_NEAR(student_t_cdf(2.2281389, 10), 0.975, 1e-7);
  EXPECT_THROW(student_t_quantile(1.0, 3), std::invalid_argument);
}

TEST(UnitStats, MeanIntervalAndPairedDifferenceEqualTheHandComputation) {
  // x = 1, 2, 3, 4: mean 2.5, s = sqrt(5/3) = 1.2909944, s.e. 0.6454972, t(3) 3.1824463, half
  // 2.0542602.
  Interval a = mean_interval({1, 2, 3, 4});
  EXPECT_EQ(a.n, 4);
  EXPECT_DOUBLE_EQ(a.mean, 2.5);
  EXPECT_NEAR(a.sd, 1.2909944, 1e-7);
  EXPECT_NEAR(a.half, 3.1824463 * 0.6454972, 1e-6);
  EXPECT_NEAR(a.lo, 2.5 - 2.0542602, 1e-6);
  EXPECT_TRUE(a.excludes_zero());
  // One value: no interval.
  Interval one = mean_interval({5.76});
  EXPECT_EQ(one.n, 1);
  EXPECT_TRUE(std::isnan(one.half));
  EXPECT_FALSE(one.excludes_zero());
  EXPECT_EQ(one.text(2), "5.76");
  EXPECT_THROW(mean_interval({}), std::invalid_argument);
  // Paired: d = -0.1, -0.2, -0.1: mean -0.1333333, s 0.0577350, s.e. 0.0333333, half 0.1434218:
  // the interval [-0.2767551, 0.0100884] holds zero.
  Interval p = paired_interval({5.0, 5.2, 5.1}, {5.1, 5.4, 5.2});
  EXPECT_NEAR(p.mean, -0.1333333, 1e-7);
  EXPECT_NEAR(p.half, 0.1434218, 1e-6);
  EXPECT_NEAR(p.hi, 0.0100884, 1e-6);
  EXPECT_FALSE(p.excludes_zero());
  // d = -0.10, -0.12, -0.11: mean -0.11, s 0.01, half 4.3026527 * 0.01 / sqrt(3) = 0.0248414.
  Interval q = paired_interval({5.00, 5.18, 5.09}, {5.10, 5.30, 5.20});
  EXPECT_NEAR(q.mean, -0.11, 1e-9);
  EXPECT_NEAR(q.half, 0.0248414, 1e-6);
  EXPECT_TRUE(q.excludes_zero());
  // Unpaired, the same numbers' intervals overlap widely: pairing is what separates them.
  Interval q1 = mean_interval({5.00, 5.18, 5.09}), q2 = mean_interval({5.10, 5.30, 5.20});
  EXPECT_GT(q1.hi, q2.lo);
  EXPECT_THROW(paired_interval({1, 2}, {1}), std::invalid_argument);
}

using test::write_sweep;

TEST(UnitSweep, SeedsGroupIntoConfigurationsWhateverTheOtherAxes) {
  const std::string d = test::scratch_dir("sweep_configs");
  auto s = SweepSpec::load(write_sweep(d,
                                       "name: cfg\n"
                                       "axes:\n"
                                       "  - grid: {optim.lr: [0.01, 0.02]}\n"
                                       "  - list:\n"
                                       "      - {label: micro, set: {}}\n"
                                       "      - {label: global, set: {model.qk_norm: true}}\n"
                                       "seeds: [0, 1, 2]\n"
                                       "baseline: micro_lr-0.01\n"
                                       "target: {val_nelbo: 6.5}\n"));
  ASSERT_EQ(s.cells.size(), 12u);
  EXPECT_EQ(s.configs, (std::vector<std::string>{"micro_lr-0.01", "global_lr-0.01",
                                                 "micro_lr-0.02", "global_lr-0.02"}));
  EXPECT_EQ(s.seeds, (std::vector<int64_t>{0, 1, 2}));
  for (const auto& c : s.cells) {
    const std::string seed = c.values.at("seed");
    EXPECT_EQ(c.name, c.config + "_s" + seed);
  }
  EXPECT_EQ(s.baseline, "micro_lr-0.01");
  ASSERT_TRUE(s.target_val_nelbo.has_value());
  EXPECT_DOUBLE_EQ(*s.target_val_nelbo, 6.5);
  // A seed axis written as a grid is a seed too; only the seed varying: one configuration.
  auto g = SweepSpec::load(write_sweep(d, "name: g\naxes: [{grid: {seed: [3, 4]}}]\n"));
  EXPECT_EQ(g.configs, (std::vector<std::string>{"base"}));
  EXPECT_EQ(g.seeds, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(g.cells[0].name, "seed-3");
  // A baseline that names no configuration is refused with the ones there are.
  try {
    SweepSpec::load(write_sweep(d,
                                "name: b\naxes: [{list: [{label: a, set: {}}, {label: b, set: "
                                "{}}]}]\nseeds: [0, 1]\nbaseline: c\n"));
    FAIL() << "accepted an unknown baseline";
  } catch (const ConfigError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("baseline"), std::string::npos) << m;
    EXPECT_NE(m.find("'c' is not a configuration"), std::string::npos) << m;
    EXPECT_NE(m.find("a, b"), std::string::npos) << m;
  }
}

// A finished cell written by hand: cell.json and a metrics.jsonl with evaluations at 1000 and
// 2000 tokens (10 s of training each, 1 s of evaluation).
void fake_cell(const std::string& root, const std::string& config, int seed,
               const std::vector<double>& val, double lbl, const std::string& status = "finished") {
  const std::string name = config + "_s" + std::to_string(seed);
  const std::string dir = root + "/" + name;
  fs::create_directories(dir);
  nlohmann::json cell = {{"index", seed},       {"name", name},
                         {"config", config},    {"status", status},
                         {"values", {{"label", config}, {"seed", std::to_string(seed)}}}};
  test::write_text(dir + "/cell.json", cell.dump());
  std::ostringstream m;
  for (size_t i = 0; i < val.size(); ++i) {
    nlohmann::json line = {{"step", 10 * (i + 1)},
                           {"tokens", 1000.0 * static_cast<double>(i + 1)},
                           {"elapsed_s", 11.0 * static_cast<double>(i + 1) - 1},
                           {"val_nelbo", val[i]},
                           {"val_nelbo_se", 0.004},
                           {"val_seconds", 1.0},
                           {"aux", {{"load_balance", lbl}}}};
    m << line.dump() << "\n";
  }
  test::write_text(dir + "/metrics.jsonl", m.str());
}

TEST(UnitReport, ConfigurationAndPairedTablesOfAHandMadeSweep) {
  const std::string root = test::scratch_dir("sweep_tables") + "/s";
  fs::create_directories(root);
  nlohmann::json sj = {{"name", "s"},
                       {"varied_keys", {"label", "seed"}},
                       {"configs", {"micro", "global"}},
                       {"seeds", {0, 1, 2}},
                       {"baseline", "micro"},
                       {"target_val_nelbo", 6.0}};
  test::write_text(root + "/sweep.json", sj.dump());
  // micro: final 5.0, 5.2, 5.1; global: 5.00, 5.18, 5.09 (d = -0.10, -0.12, -0.11 above) ...
  fake_cell(root, "micro", 0, {6.5, 5.0}, 1.10);
  fake_cell(root, "micro", 1, {6.5, 5.2}, 1.20);
  fake_cell(root, "micro", 2, {6.5, 5.1}, 1.30);
  fake_cell(root, "global", 0, {6.2, 4.9}, 1.00);
  fake_cell(root, "global", 1, {6.2, 5.08}, 1.00);
  // ... except that global's seed 2 failed: it is missing, and the pairs are seeds 0 and 1.
  fake_cell(root, "global", 2, {}, 0, "failed");
  auto runs = read_sweep(root);
  ASSERT_EQ(runs.size(), 6u);
  const SweepDesign d = SweepDesign::read(root, runs);
  EXPECT_EQ(d.baseline, "micro");

  const ResultTable c = configuration_table(runs, d);
  ASSERT_EQ(c.rows.size(), 2u);
  auto col = [&](const ResultTable& t, const std::string& h) {
    for (size_t i = 0; i < t.header.size(); ++i) {
      if (t.header[i] == h) return i;
    }
    ADD_FAILURE() << "no column " << h;
    return size_t(0);
  };
  EXPECT_EQ(c.rows[0][0], "micro (baseline)");
  EXPECT_EQ(c.rows[0][1], "3 of 3");
  EXPECT_EQ(c.rows[1][1], "2 of 3 (missing: 2)");
  // micro: mean 5.1, s 0.1, half 4.3026527 * 0.1 / sqrt(3) = 0.2484138.
  EXPECT_EQ(c.rows[0][col(c, "final val NELBO")], "5.1000 ± 0.2484");
  // Tokens to 6.0: micro crosses between (1000, 6.5) and (2000, 5.0..5.2); seed 0 at
  // 1000 + 0.5 / 1.5 * 1000 = 1333, after 10 + 3.33 s of training (evaluation not counted).
  const RunSummary* micro0 = nullptr;
  for (const auto& r : runs) {
    if (r.name == "micro_s0") micro0 = &r;
  }
  ASSERT_NE(micro0, nullptr);
  EXPECT_EQ(micro0->seed, 0);
  EXPECT_NEAR(micro0->tokens_to(6.0), 1000 + 0.5 / 1.5 * 1000, 1e-9);
  EXPECT_NEAR(micro0->seconds_to(6.0), 10 + 0.5 / 1.5 * 10, 1e-9);
  EXPECT_TRUE(std::isnan(micro0->tokens_to(4.0)));
  // global reaches 6.0 between 1000 (6.2) and 2000 tokens: 1000 + 0.2 / 1.3 * 1000 = 1153.8 and
  // 1000 + 0.2 / 1.12 * 1000 = 1178.6.
  EXPECT_EQ(c.rows[1][col(c, "tokens to val NELBO 6")], "1166 ± 157");

  const ResultTable p = paired_table(runs, d);
  ASSERT_EQ(p.rows.size(), 1u);
  EXPECT_EQ(p.rows[0][0], "global");
  EXPECT_EQ(p.rows[0][1], "2");
  // d = -0.10, -0.12 over seeds 0, 1: mean -0.11, s 0.0141421, half 12.7062047 * 0.01 = 0.1271.
  EXPECT_EQ(p.rows[0][col(p, "Δ final val NELBO")], "-0.1100 [-0.2371, 0.0171]");
  // LBL: d = -0.10, -0.20: mean -0.15, s 0.0707107, half 12.7062047 * 0.05 = 0.6353.
  EXPECT_EQ(p.rows[0][col(p, "Δ LBL")], "-0.1500 [-0.7853, 0.4853]");

  // Task accuracies (RUN/eval_tasks.json, `tasks.run` after training) are columns too: micro
  // 0.30, 0.40, 0.35 -> 0.350 ± 4.3026527 * 0.05 / sqrt(3) = 0.124; paired over seeds 0 and 1 with
  // global 0.40, 0.45: d = 0.10, 0.05, mean 0.075, half 12.7062047 * 0.025 = 0.318.
  const double micro_acc[] = {0.30, 0.40, 0.35}, global_acc[] = {0.40, 0.45};
  for (int sd = 0; sd < 3; ++sd) {
    test::write_text(root + "/micro_s" + std::to_string(sd) + "/eval_tasks.json",
                     nlohmann::json{{"tasks", {{{"task", "wordnet_mc"}, {"acc", micro_acc[sd]}}}}}.dump());
    if (sd < 2) {
      test::write_text(root + "/global_s" + std::to_string(sd) + "/eval_tasks.json",
                       nlohmann::json{{"tasks", {{{"task", "wordnet_mc"}, {"acc", global_acc[sd]}}}}}.dump());
    }
  }
  {
    auto with_tasks = read_sweep(root);
    const ResultTable ct = configuration_table(with_tasks, d);
    EXPECT_EQ(ct.rows[0][col(ct, "acc wordnet_mc")], "0.350 ± 0.124");
    const ResultTable pt = paired_table(with_tasks, d);
    EXPECT_EQ(pt.rows[0][col(pt, "Δ acc wordnet_mc")], "0.075 [-0.243, 0.393]");
  }

  // The CSV holds the same numbers per configuration; markdown holds all three tables.
  const std::string csv = results_csv(runs, d);
  EXPECT_NE(csv.find("micro,yes,3,3,,5.1,4.8515862,5.3484138,3"), std::string::npos) << csv;
  EXPECT_NE(csv.find("global,,2,3,2,"), std::string::npos) << csv;
  const std::string md = results_markdown(runs, d);
  EXPECT_NE(md.find("Paired differences to micro"), std::string::npos) << md;
  EXPECT_NE(md.find("| global_s2 | global | global | 2 | failed |"), std::string::npos) << md;
  // The report draws bands for the configurations and holds both tables.
  const std::string html = test::read_text(write_report(root));
  EXPECT_NE(html.find("<h2>Paired differences to micro</h2>"), std::string::npos);
  EXPECT_NE(html.find("fill-opacity=\"0.18\""), std::string::npos);
  EXPECT_NE(html.find("mean and 95% band over seeds"), std::string::npos);
}

}  // namespace
}  // namespace mixdiff
