// Sweeps and reports: axis expansion and names, bad sweep files refused before any run, a sweep
// that runs, records failed cells, resumes after an interrupt without re-running finished cells,
// and a report that opens in headless Chromium.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <regex>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "report/report.h"
#include "support/support.h"
#include "sweep/sweep.h"

namespace mixdiff {
namespace {

namespace fs = std::filesystem;
using test::run_mixdiff;

const std::string& tiny_dir() { return test::tiny_dir("sweep"); }

using test::write_sweep;

TEST(UnitSweep, ExpandsGridZipListAndSeedsIntoNamedCells) {
  const std::string d = test::scratch_dir("sweep_expand");
  auto s = SweepSpec::load(write_sweep(d,
                                       "name: ex\n"
                                       "set: {train.steps: 5}\n"
                                       "axes:\n"
                                       "  - grid: {optim.lr: [0.01, 0.02], model.d_model: [16, 32]}\n"
                                       "  - zip: {train.batch_size: [4, 8], train.grad_accum: [2, 1]}\n"
                                       "  - list:\n"
                                       "      - {label: plain, set: {}}\n"
                                       "      - {label: qk, set: {model.qk_norm: true}}\n"
                                       "seeds: [0, 1]\n"));
  ASSERT_EQ(s.cells.size(), 2u * 2 * 2 * 2 * 2);
  const auto& c0 = s.cells[0];
  EXPECT_EQ(c0.name, "plain_lr-0.01_d_model-16_batch_size-4_grad_accum-2_s0");
  EXPECT_EQ(s.varied_keys, (std::vector<std::string>{"label", "optim.lr", "model.d_model",
                                                      "train.batch_size", "train.grad_accum",
                                                      "model.qk_norm", "seed"}));
  ASSERT_GE(c0.overrides.size(), 6u);
  EXPECT_EQ(c0.overrides[0], (std::pair<std::string, std::string>{"train.steps", "5"}));
  EXPECT_EQ(c0.overrides.back(), (std::pair<std::string, std::string>{"seed", "0"}));
  EXPECT_EQ(s.cells[1].values.at("seed"), "1");
  EXPECT_EQ(s.cells[2].values.at("label"), "qk");
  // The zip axis pairs its lists; the grid is the product (lr outermost).
  EXPECT_EQ(s.cells[4].values.at("train.batch_size"), "8");
  EXPECT_EQ(s.cells[4].values.at("train.grad_accum"), "1");
  EXPECT_EQ(s.cells[8].values.at("model.d_model"), "32");
  EXPECT_EQ(s.cells[16].values.at("optim.lr"), "0.02");
  auto t = SweepSpec::load(write_sweep(d,
                                       "name: ex2\n"
                                       "axes: [{grid: {model.moe: [{n_expert: 4, d_expert: 8}]}}]\n"
                                       "cell_name: \"moe_{model.moe}\"\n"
                                       "budget: {tokens: 1000}\n"));
  EXPECT_EQ(t.cells[0].values.at("model.moe"), "{n_expert: 4, d_expert: 8}");
  EXPECT_EQ(t.cells[0].name, "moe_n_expert_4_d_expert_8");
  EXPECT_EQ(*t.budget_tokens, 1000.0);
}

std::string sweep_error(const std::string& body) {
  const std::string d = test::scratch_dir("sweep_err");
  try {
    SweepSpec::load(write_sweep(d, body));
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(UnitSweep, BadSweepFilesNameFileLineAndKey) {
  EXPECT_NE(sweep_error("name: a\naxis: []\n").find("sweep.yaml:3"), std::string::npos);
  EXPECT_NE(sweep_error("name: a\naxis: []\n").find("unknown key"), std::string::npos);
  EXPECT_NE(sweep_error("name: a\naxes: [{zip: {a: [1, 2], b: [1]}}]\n").find("equal lengths"),
            std::string::npos);
  EXPECT_NE(sweep_error("name: a\naxes: [{grid: {a: [1, 2]}}]\ncell_name: same\n")
                .find("both named 'same'"),
            std::string::npos);
  EXPECT_NE(sweep_error("name: a\naxes: [{grid: {a: [1]}}]\ncell_name: \"{b}\"\n")
                .find("'{b}' is not a varied key"),
            std::string::npos);
  EXPECT_NE(sweep_error("name: a\naxes: [{cross: {a: [1]}}]\n").find("unknown key"),
            std::string::npos);
  EXPECT_NE(sweep_error("name: 'a b'\n").find("expected a folder name"), std::string::npos);
}

std::vector<std::vector<std::string>> csv_rows(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& l : test::lines(test::read_text(path))) {
    std::vector<std::string> row;
    std::string cur;
    bool q = false;
    for (char c : l) {
      if (c == '"') {
        q = !q;
      } else if (c == ',' && !q) {
        row.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    row.push_back(cur);
    rows.push_back(row);
  }
  return rows;
}

TEST(UnitSweep, BudgetsTurnIntoStepsByTheTokensOrFlopsPerStep) {
  const std::string d = test::scratch_dir("sweep_budget");
  // 1.2e6 tokens at 2048 tokens per step: 585.9 -> 586 steps.
  auto t = SweepSpec::load(write_sweep(d, "name: b\nbudget: {tokens: 1.2e6}\naxes: [{grid: {seed: [0]}}]\n"));
  EXPECT_EQ(t.budget_steps(2048, 1e9, 77), 586);
  // 3e15 FLOPs at 2.5e7 FLOPs per token and 2048 tokens per step: 58593.75 -> 58594 steps.
  auto f = SweepSpec::load(write_sweep(d, "name: b\nbudget: {flops: 3e15}\naxes: [{grid: {seed: [0]}}]\n"));
  EXPECT_EQ(f.budget_steps(2048, 2.5e7, 77), 58594);
  EXPECT_EQ(f.budget_steps(2048, 1e20, 77), 1);  // at least one step
  auto none = SweepSpec::load(write_sweep(d, "name: b\naxes: [{grid: {seed: [0]}}]\n"));
  EXPECT_EQ(none.budget_steps(2048, 2.5e7, 77), 77);  // no budget: the recipe's steps
}

TEST(E2ESweep, FlopBudgetPlansMatchedComputeAndRefusesDataDependentRouting) {
  const std::string d = test::scratch_dir("sweep_flops");
  // Cells with more active experts get fewer steps: steps = round(budget / (FLOPs/token x
  // tokens/step)), the cell's planned FLOPs per token (tiny recipe: 8 x 32 tokens per step).
  const std::string moe =
      "{n_expert: 4, d_expert: 16, router: {kind: token_choice, top_k: K}}";
  auto f = write_sweep(d, "name: fl\nbudget: {flops: 2.0e9}\nset: {model.kind: moe_dlm}\naxes:\n"
                          "  - list:\n"
                          "      - {label: k1, set: {model.moe: " + std::regex_replace(moe, std::regex("K"), "1") + "}}\n"
                          "      - {label: k2, set: {model.moe: " + std::regex_replace(moe, std::regex("K"), "2") + "}}\n");
  auto plan = run_mixdiff({"sweep", f, "--dry-run", "--out", d + "/runs"});
  ASSERT_EQ(plan.status, 0) << plan.err;
  std::smatch m1, m2;
  ASSERT_TRUE(std::regex_search(plan.out, m1, std::regex("k1 +\\(new, ([0-9]+) steps\\)"))) << plan.out;
  ASSERT_TRUE(std::regex_search(plan.out, m2, std::regex("k2 +\\(new, ([0-9]+) steps\\)"))) << plan.out;
  EXPECT_GT(std::stoi(m1[1]), std::stoi(m2[1]));
  // Top-p's experts per token are only known after training: a FLOP budget is refused.
  auto p = write_sweep(d, "name: tp\nbudget: {flops: 2.0e9}\nset: {model.kind: moe_dlm, model.moe: "
                          "{n_expert: 4, d_expert: 16, router: {kind: top_p, p: 0.5}}}\n"
                          "axes: [{grid: {seed: [0]}}]\n");
  auto bad = run_mixdiff({"sweep", p, "--dry-run", "--out", d + "/runs"});
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("data-dependent"), std::string::npos) << bad.err;
}

TEST(E2ESweep, BadCellIsRejectedBeforeAnyRunStarts) {
  const std::string d = test::scratch_dir("sweep_bad");
  const std::string f = write_sweep(d, "name: bad\naxes: [{grid: {train.stepz: [1, 2]}}]\n");
  auto r = run_mixdiff({"sweep", f, "--out", d + "/runs"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("train.stepz"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(d + "/runs/bad"));
}

// Expert-parallel cells run under `--launch K`: a layout that fits K workers plans, one that does
// not is refused before any run starts, naming the key.
TEST(E2ESweep, ExpertParallelCellsMustFitTheLaunchedWorkers) {
  const std::string d = test::scratch_dir("sweep_ep");
  const std::string head = "set: {model.kind: moe_dlm, model.moe: {n_expert: 4, d_expert: 16, "
                           "router: {kind: token_choice, top_k: 2}}}\n";
  auto ok = write_sweep(d, "name: ep\n" + head + "axes: [{grid: {dist.expert_parallel: [1, 2]}}]\n");
  auto plan = run_mixdiff({"sweep", ok, "--launch", "2", "--dry-run", "--out", d + "/runs"});
  EXPECT_EQ(plan.status, 0) << plan.err;
  auto bad = write_sweep(d, "name: ep3\n" + head + "axes: [{grid: {dist.expert_parallel: [3]}}]\n");
  auto r = run_mixdiff({"sweep", bad, "--launch", "2", "--out", d + "/runs"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("dist.expert_parallel: 3 must be a positive divisor of the world size 2"),
            std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(d + "/runs/ep3"));
}

// Every shipped sweep plans: its cells build as `mixdiff train` would build them (on the tiny
// fixture data instead of the built-in corpus).
TEST(E2ESweep, EveryShippedSweepPlans) {
  const std::string d = tiny_dir();
  int n = 0;
  for (const auto& e : fs::directory_iterator(test::source_dir() + "/recipes/sweeps")) {
    if (e.path().extension() != ".yaml") continue;
    ++n;
    std::vector<std::string> args = {"sweep", e.path().string(), "--dry-run", "--out",
                                     d + "/shipped", "--set", "data.path=" + d + "/data",
                                     "--set", "data.prepare=null"};
    // a2d starts from an imported checkpoint that only its experiment makes: plan without it.
    if (e.path().filename() == "a2d.yaml") args.insert(args.end(), {"--set", "init.checkpoint=\"\""});
    auto plan = run_mixdiff(args);
    EXPECT_EQ(plan.status, 0) << e.path() << ": " << plan.err;
    EXPECT_NE(plan.out.find(" cells of "), std::string::npos) << e.path() << ": " << plan.out;
  }
  EXPECT_GE(n, 6);
  EXPECT_FALSE(fs::exists(d + "/shipped"));
}

TEST(E2ESweep, RunsEveryCellKeepsFailedOnesAndResumesWithoutRerunningFinishedCells) {
  const std::string d = test::scratch_dir("sweep_run");
  // Three cells: two train; `huge` diverges (non-finite loss) and fails at run time.
  const std::string f = write_sweep(d,
                                    "name: small\n"
                                    "set: {train.steps: 6, train.log_every: 2}\n"
                                    "axes:\n"
                                    "  - list:\n"
                                    "      - {label: a, set: {optim.lr: 0.01}}\n"
                                    "      - {label: huge, set: {optim.lr: 1.0e30}}\n"
                                    "      - {label: b, set: {optim.lr: 0.02}}\n");
  auto plan = run_mixdiff({"sweep", f, "--out", d + "/runs", "--dry-run"});
  ASSERT_EQ(plan.status, 0) << plan.err;
  EXPECT_NE(plan.out.find("3 cells"), std::string::npos) << plan.out;
  EXPECT_FALSE(fs::exists(d + "/runs/small"));
  auto r = run_mixdiff({"sweep", f, "--out", d + "/runs", "--jobs", "2"});
  EXPECT_EQ(r.status, 1) << r.err << r.out;  // one cell failed
  const std::string root = d + "/runs/small";
  auto rows = csv_rows(root + "/cells.csv");
  ASSERT_EQ(rows.size(), 4u) << test::read_text(root + "/cells.csv");
  EXPECT_EQ(rows[0], (std::vector<std::string>{
                         "run", "configuration", "label", "optim.lr", "status", "final_val_nelbo",
                         "best_val_nelbo", "tokens", "tokens_per_s", "parameters",
                         "active_parameters", "train_flops_per_token", "train_flops",
                         "max_mean_load", "load_balance", "specialisation", "wall_s", "error"}));
  EXPECT_EQ(rows[1][0], "a");
  EXPECT_EQ(rows[1][1], "a");
  EXPECT_EQ(rows[1][3], "0.01");
  EXPECT_EQ(rows[2][0], "huge");
  EXPECT_EQ(rows[2][4], "failed");
  EXPECT_NE(rows[2].back().find("non-finite loss"), std::string::npos) << rows[2].back();
  EXPECT_EQ(rows[1][4], "finished");
  EXPECT_EQ(rows[3][4], "finished");
  EXPECT_FALSE(rows[1][5].empty());  // final val NELBO
  EXPECT_FALSE(rows[1][11].empty());  // training FLOPs per token
  // One configuration per cell (no seeds): results.csv has a row each, the failed one empty.
  auto configs = csv_rows(root + "/results.csv");
  ASSERT_EQ(configs.size(), 4u) << test::read_text(root + "/results.csv");
  EXPECT_EQ(configs[0][0], "configuration");
  EXPECT_EQ(configs[0][5], "final_val_nelbo_mean");
  EXPECT_EQ(configs[1][0], "a");
  EXPECT_NEAR(std::stod(configs[1][5]), std::stod(rows[1][5]), 1e-4);
  EXPECT_EQ(configs[2][2], "0");  // huge: no seed finished
  EXPECT_TRUE(fs::exists(root + "/results.md"));
  EXPECT_TRUE(fs::exists(root + "/report.html"));
  // Run again: finished cells are not re-run, the failed one is tried again.
  const auto before = test::read_text(root + "/a/metrics.jsonl");
  auto again = run_mixdiff({"sweep", f, "--out", d + "/runs"});
  EXPECT_NE(again.out.find("[0] a already finished"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("[2] b already finished"), std::string::npos) << again.out;
  EXPECT_EQ(test::read_text(root + "/a/metrics.jsonl"), before);
}

TEST(E2ESweep, AnInterruptedSweepResumesItsCell) {
  const std::string d = test::scratch_dir("sweep_int");
  const std::string f = write_sweep(d,
                                    "name: long\n"
                                    "set: {train.steps: 400, train.log_every: 10}\n"
                                    "axes: [{grid: {seed: [3]}}]\n");
  const int pid = test::spawn_mixdiff({"sweep", f, "--out", d + "/runs"}, d + "/out", d + "/err");
  const std::string cell_out = d + "/runs/long/seed-3/stdout.log";
  for (int i = 0; i < 600; ++i) {
    if (test::read_text(cell_out).find("step ") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid, SIGINT);
  EXPECT_EQ(test::wait_for(pid), 128 + SIGINT) << test::read_text(d + "/err");
  auto cell = nlohmann::json::parse(test::read_text(d + "/runs/long/seed-3/cell.json"));
  EXPECT_EQ(cell["status"], "interrupted");
  auto again = run_mixdiff({"sweep", f, "--out", d + "/runs"});
  ASSERT_EQ(again.status, 0) << again.err << again.out;
  EXPECT_NE(again.out.find("seed-3 resumed"), std::string::npos) << again.out;
  cell = nlohmann::json::parse(test::read_text(d + "/runs/long/seed-3/cell.json"));
  EXPECT_EQ(cell["status"], "finished");
}

TEST(E2EReport, ReportOpensInHeadlessChromiumWithoutConsoleErrors) {
  const std::string chromium = "/usr/bin/chromium";
  const std::string d = test::scratch_dir("report_browser");
  const std::string f = write_sweep(
      d,
      "name: rep\n"
      "set: {train.steps: 20, train.log_every: 4, eval.every: 10}\n"
      "axes:\n"
      "  - list:\n"
      "      - {label: dense, set: {}}\n"
      "      - {label: moe, set: {model.kind: moe_dlm, model.moe: {n_expert: 4, d_expert: 16, "
      "router: {kind: token_choice, top_k: 2}}, losses: [{kind: masked_diffusion_elbo}, {kind: "
      "load_balance, weight: 0.01}]}}\n"
      "seeds: [0, 1]\n"
      "baseline: dense\n");
  auto r = run_mixdiff({"sweep", f, "--out", d + "/runs", "--jobs", "2"});
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  const std::string html = d + "/runs/rep/report.html";
  const std::string page = test::read_text(html);
  // Two seeds per configuration: the configuration and paired tables, and mean curves with
  // their 95% bands; the MoE cells' specialisation section (one domain in the fixture data).
  for (const char* part : {"<svg", "validation NELBO", "learning rate", "expert load / mean",
                           "load imbalance", "mask ratio [0, 0.25)", "<table",
                           "<h2>Configurations</h2>", "<h2>Paired differences to dense</h2>",
                           "mean and 95% band over seeds", "fill-opacity=\"0.18\"",
                           "specialisation and local routing consistency"}) {
    EXPECT_NE(page.find(part), std::string::npos) << part;
  }
  EXPECT_EQ(page.find("<script"), std::string::npos);
  EXPECT_EQ(page.find("http"), std::string::npos);  // nothing fetched from the network
  if (!fs::exists(chromium)) {
    GTEST_SKIP() << "Debian's chromium is not installed (tools/setup.sh installs it for the tests)";
  }
  const std::string png = d + "/report.png";
  const std::string cmd =
      chromium +
      " --headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
      "--disable-background-networking --disable-component-update --disable-sync "
      "--user-data-dir=" + d + "/profile --enable-logging=stderr --v=0 "
      "--window-size=1400,2400 --screenshot=" + png + " file://" + html + " > " + d +
      "/chromium.log 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << test::read_text(d + "/chromium.log");
  ASSERT_TRUE(fs::exists(png));
  EXPECT_GT(fs::file_size(png), 20000u);  // a page with plots, not a blank screen
  const std::string log = test::read_text(d + "/chromium.log");
  EXPECT_EQ(log.find(":CONSOLE("), std::string::npos) << log;
}

}  // namespace
}  // namespace mixdiff
