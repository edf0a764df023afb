// `mixdiff sweep` and `mixdiff report`.
//
// sweep: expands a sweep file (src/sweep/sweep.h), prepares the base recipe's data when needed,
// validates every cell by building it exactly as `mixdiff train` would (so a bad key fails before
// any run starts), fixes train.steps per cell from a token or FLOP budget, prints the plan, then
// runs the cells as child processes (`mixdiff train`, or `mixdiff launch` with --launch K), N at a
// time. A cell whose run already reached its steps is skipped; one with checkpoints is resumed;
// so an interrupted sweep continues where it stopped. SIGINT/SIGTERM are forwarded to the running
// cells (which checkpoint) and the sweep exits with 128 + signal. Every cell's state is in
// runs/<sweep>/<cell>/cell.json; results.md, results.csv (per configuration: the mean over seeds
// with its interval, and the paired difference to the baseline), cells.csv and report.html are
// written at the end, failed cells included with their error line.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "app/app.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/fs.h"
#include "core/process.h"
#include "data/prepare.h"
#include "eval/tasks.h"
#include "dist/expert_parallel.h"
#include "infer/sampler.h"
#include "report/report.h"
#include "sweep/sweep.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

extern char** environ;

namespace mixdiff {

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_sweep_signal{0};
void on_sweep_signal(int sig) { g_sweep_signal.store(sig); }

std::string last_line(const std::string& path) {
  std::ifstream in(path);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  }
  return last;
}

struct CellPlan {
  SweepCell cell;
  std::string dir;
  int64_t steps = 0;
  std::string mode;  ///< done, resume, new
};

/// Steps already done by the run in `dir` (0 when it has no checkpoint).
int64_t steps_done(const std::string& dir) {
  if (!fs::exists(dir + "/checkpoints/latest")) return 0;
  try {
    return verify_checkpoint(resolve_checkpoint(dir)).value("step", int64_t(0));
  } catch (const InputError&) {
    return 0;
  }
}

void write_cell(const CellPlan& p, const std::string& status, const std::string& error,
                double wall_s) {
  nlohmann::json values = nlohmann::json::object();
  for (const auto& [k, v] : p.cell.values) values[k] = v;
  nlohmann::json ov = nlohmann::json::array();
  for (const auto& [k, v] : p.cell.overrides) ov.push_back(k + "=" + v);
  nlohmann::json j = {{"index", p.cell.index}, {"name", p.cell.name}, {"config", p.cell.config},
                      {"values", values},
                      {"overrides", ov},       {"steps", p.steps},     {"status", status},
                      {"error", error},        {"wall_s", wall_s}};
  write_file_atomic(p.dir + "/cell.json", j.dump(2) + "\n");
}

}  // namespace

int cmd_sweep(const SweepArgs& a) {
  SweepSpec spec = SweepSpec::load(a.file);
  if (a.jobs < 1) throw ConfigError("sweep: --jobs must be at least 1");
  if (a.launch < 0) throw ConfigError("sweep: --launch must be 0 (one process) or a worker count");
  const std::string root = (a.out.empty() ? std::string("runs") : a.out) + "/" + spec.name;

  // Data first (cells usually share it), then every cell validated as `mixdiff train` would.
  {
    ConfigNode base = ConfigNode::from_file(spec.base);
    for (const auto& o : a.overrides) base.apply_override(o);
    ConfigNode data = base.at("data");
    if (data.has("prepare") && data.get<std::string>("kind") == "token_shards") {
      std::ostringstream log;
      prepare_dataset(data, /*force=*/false, log);
      std::cout << log.str();
    }
  }
  const int world = std::max(1, a.launch);
  std::vector<CellPlan> plan;
  for (const auto& cell : spec.cells) {
    CellPlan p;
    p.cell = cell;
    p.dir = root + "/" + cell.name;
    auto build = [&](bool with_steps, int64_t steps) {
      ConfigNode r = ConfigNode::from_file(spec.base);
      for (const auto& o : a.overrides) r.apply_override(o);
      for (const auto& [k, v] : cell.overrides) r.apply_override(k + "=" + v);
      if (with_steps) r.apply_override("train.steps=" + std::to_string(steps));
      return r;
    };
    try {
      ConfigNode r = build(false, 0);
      TrainerParts parts = build_trainer_parts(r);
      GenerateSettings::from(r);
      TaskSettings::from_recipe(r);
      r.check_unknown_keys();
      // The cell's parallel layout must fit the workers it will get.
      ParallelLayout(world, static_cast<int>(parts.options.expert_parallel), 0);
      p.steps = parts.options.steps;
      const double tokens_per_step = static_cast<double>(world * parts.options.batch_size *
                                                         parts.options.grad_accum *
                                                         parts.data->seq_len());
      if (spec.budget_flops && parts.model->experts_per_token_data_dependent()) {
        throw ConfigError(str(spec.file, ": budget: flops needs the experts per token before "
                              "training, but cell '", cell.name, "' routes with a data-dependent "
                              "count (top_p or null experts); use budget: {tokens: ...}"));
      }
      p.steps = spec.budget_steps(tokens_per_step,
                                  parts.model->train_flops_per_token(parts.data->seq_len()),
                                  p.steps);
      if (spec.budget_tokens || spec.budget_flops) {
        p.cell.overrides.emplace_back("train.steps", std::to_string(p.steps));
      }
    } catch (const InputError& e) {
      throw ConfigError(str(spec.file, ": cell '", cell.name, "': ", e.what()));
    }
    const int64_t done = steps_done(p.dir);
    p.mode = done >= p.steps ? "done" : done > 0 ? "resume" : "new";
    plan.push_back(std::move(p));
  }

  std::cout << "sweep " << spec.name << ": " << plan.size() << " cells of " << spec.base << " -> "
            << root << "/\n";
  for (const auto& p : plan) {
    std::cout << "  [" << p.cell.index << "] " << p.cell.name << "  (" << p.mode << ", "
              << p.steps << " steps)";
    for (const auto& [k, v] : p.cell.values) std::cout << "  " << k << "=" << v;
    std::cout << "\n";
  }
  std::cout << std::flush;
  if (a.dry_run) return 0;

  fs::create_directories(root);
  nlohmann::json sj = {{"name", spec.name}, {"file", fs::absolute(spec.file).string()},
                       {"base", spec.base}, {"varied_keys", spec.varied_keys},
                       {"cells", plan.size()}, {"configs", spec.configs},
                       {"seeds", spec.seeds}, {"baseline", spec.baseline}};
  if (spec.target_val_nelbo) sj["target_val_nelbo"] = *spec.target_val_nelbo;
  write_file_atomic(root + "/sweep.json", sj.dump(2) + "\n");

  struct sigaction sa {};
  sa.sa_handler = on_sweep_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const int blas = std::max(1, static_cast<int>(cores) / (a.jobs * world));
  struct Running {
    size_t plan_index;
    pid_t pid;
    std::chrono::steady_clock::time_point start;
  };
  std::vector<Running> running;
  size_t next = 0;
  int port = 29600 + static_cast<int>(getpid() % 1000) * 8;
  bool any_failed = false;
  auto start_cell = [&](size_t i) {
    CellPlan& p = plan[i];
    if (p.mode == "new" && fs::exists(p.dir)) {
      // An earlier attempt that never checkpointed: start it afresh.
      for (const auto& e : fs::directory_iterator(p.dir)) fs::remove_all(e.path());
    }
    fs::create_directories(p.dir);
    std::vector<std::string> args;
    if (a.launch > 0) {
      args.insert(args.end(), {"launch", "--nproc-per-node", std::to_string(a.launch),
                               "--master-port", std::to_string(port++ % 60000 + 1024), "--"});
    }
    args.push_back("train");
    if (p.mode == "resume") {
      args.insert(args.end(), {"--resume", p.dir});
    } else {
      args.insert(args.end(), {spec.base, "--out", p.dir});
    }
    for (const auto& o : a.overrides) args.insert(args.end(), {"--set", o});
    for (const auto& [k, v] : p.cell.overrides) args.insert(args.end(), {"--set", k + "=" + v});
    std::vector<std::string> env = inherited_environment();
    if (!std::getenv("OPENBLAS_NUM_THREADS")) env.push_back(str("OPENBLAS_NUM_THREADS=", blas));
    const std::string out = p.dir + "/stdout.log", err = p.dir + "/stderr.log";
    pid_t pid = -1;
    try {
      pid = spawn_self("sweep", args, env, {out, err});
    } catch (const std::runtime_error&) {
      throw std::runtime_error(str("sweep: could not start cell ", p.cell.name));
    }
    write_cell(p, "running", "", 0);
    std::cout << "sweep: [" << p.cell.index << "] " << p.cell.name << " "
              << (p.mode == "resume" ? "resumed" : "started") << " (log " << out << ")"
              << std::endl;
    running.push_back({i, pid, std::chrono::steady_clock::now()});
  };

  int forwarded = 0;
  while (true) {
    const int sig = g_sweep_signal.load();
    if (sig != 0 && forwarded == 0) {
      forwarded = sig;
      std::cout << "sweep: signal " << sig << ": stopping the running cells (they checkpoint)"
                << std::endl;
      std::vector<pid_t> pids;
      for (const auto& r : running) pids.push_back(r.pid);
      signal_children(pids, SIGINT);
    }
    while (forwarded == 0 && static_cast<int>(running.size()) < a.jobs && next < plan.size()) {
      if (plan[next].mode == "done") {
        std::cout << "sweep: [" << plan[next].cell.index << "] " << plan[next].cell.name
                  << " already finished" << std::endl;
        auto prev = nlohmann::json::object();
        if (fs::exists(plan[next].dir + "/cell.json")) {
          prev = nlohmann::json::parse(read_file(plan[next].dir + "/cell.json"), nullptr, false);
        }
        write_cell(plan[next], "finished", "", prev.is_object() ? prev.value("wall_s", 0.0) : 0.0);
        ++next;
        continue;
      }
      start_cell(next++);
    }
    if (running.empty() && (next >= plan.size() || forwarded != 0)) break;
    const auto ended = poll_child();
    if (!ended) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    for (size_t k = 0; k < running.size(); ++k) {
      if (running[k].pid != ended->pid) continue;
      CellPlan& p = plan[running[k].plan_index];
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                        running[k].start).count();
      const int code = ended->code;
      std::string st = "finished", err;
      if (code != 0) {
        if (forwarded != 0 && (code == 128 + SIGINT || code == 128 + SIGTERM)) {
          st = "interrupted";
        } else {
          st = "failed";
          err = last_line(p.dir + "/stderr.log");
          if (err.empty()) {  // the trainer reports a diverged run on its progress log
            std::ifstream in(p.dir + "/stdout.log");
            for (std::string line; std::getline(in, line);) {
              if (line.rfind("error:", 0) == 0) err = line;
            }
          }
          if (err.empty()) err = str("exit status ", code);
          any_failed = true;
        }
      }
      write_cell(p, st, err, wall);
      std::cout << "sweep: [" << p.cell.index << "] " << p.cell.name << " " << st
                << (err.empty() ? "" : ": " + err) << " (" << static_cast<int64_t>(wall) << " s)"
                << std::endl;
      running.erase(running.begin() + static_cast<std::ptrdiff_t>(k));
      break;
    }
  }

  auto runs = read_sweep(root);
  const SweepDesign design = SweepDesign::read(root, runs);
  write_file_atomic(root + "/results.csv", results_csv(runs, design));
  write_file_atomic(root + "/cells.csv", cells_csv(runs, design.keys));
  const std::string md = results_markdown(runs, design);
  write_file_atomic(root + "/results.md", md);
  const std::string report = write_report(root);
  std::cout << "\n" << md << "\nresults: " << root << "/results.md, " << root
            << "/results.csv (configurations), " << root << "/cells.csv; report: " << report
            << std::endl;
  if (forwarded != 0) {
    std::cout << "sweep interrupted; run the same command again to continue" << std::endl;
    return 128 + forwarded;
  }
  return any_failed ? 1 : 0;
}

int cmd_report(const ReportArgs& a) {
  const std::string report = write_report(a.path);
  if (!fs::exists(a.path + "/run.json")) {  // a sweep folder: its tables too
    auto runs = read_sweep(a.path);
    const SweepDesign design = SweepDesign::read(a.path, runs);
    write_file_atomic(a.path + "/results.csv", results_csv(runs, design));
    write_file_atomic(a.path + "/cells.csv", cells_csv(runs, design.keys));
    write_file_atomic(a.path + "/results.md", results_markdown(runs, design));
    std::cout << "results: " << a.path << "/results.md, " << a.path << "/results.csv, " << a.path
              << "/cells.csv" << std::endl;
  }
  std::cout << "report: " << report << std::endl;
  return 0;
}

}  // namespace mixdiff
