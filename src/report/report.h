// Run and sweep reports: one self-contained report.html (inline SVG and CSS, no scripts, no
// network) drawn from what runs write: run.json (sizes and accounting), metrics.jsonl (losses,
// learning rate, validation NELBO, routing telemetry) and, for sweep cells, cell.json (the
// varied keys and the cell's status).
//
// Contents: the results table; training-loss, validation-NELBO and learning-rate curves overlaid
// across runs; for MoE runs the expert load (tokens per expert / mean) of every MoE layer over the
// logged steps as a heatmap, the imbalance (max/mean load, mean over layers) over steps, and the
// load imbalance of each mask-ratio bucket at the end of training.
//
// Results of a sweep: cells that differ only in `seed` are one configuration.
//   results.md   the configurations (mean over seeds with a 95% Student-t interval, the seeds
//                that are missing), with a baseline the paired differences to it, then the cells
//   results.csv  one row per configuration: for each metric its mean, interval and count, and
//                its paired difference to the baseline with interval and count
//   cells.csv    one row per cell, failed cells included with their error
// The report draws each configuration's mean curve with its 95% band when it has several seeds.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mixdiff {

/// Everything a report or a results table knows about one run.
struct RunSummary {
  std::string name;            ///< run (cell) name
  std::string dir;             ///< run folder
  nlohmann::json info;         ///< run.json (null when the run never started training)
  nlohmann::json cell;         ///< cell.json of a sweep cell (varied keys, status, error)
  std::vector<nlohmann::json> metrics;  ///< metrics.jsonl lines
  std::string status;          ///< finished, failed, interrupted, pending, partial
  std::string error;           ///< the failure's one line (failed cells)
  double final_val_nelbo = -1, best_val_nelbo = -1;
  double tokens = 0, tokens_per_s = 0, wall_s = 0;
  double final_max_mean = -1;  ///< last logged max/mean expert load, mean over MoE layers
  double final_lbl = -1;       ///< last logged load_balance aux value (unweighted)
  double final_val_se = -1;    ///< standard error of the last validation NELBO
  /// Last logged expert specialisation by domain and local routing consistency (segment routing
  /// best performance, segment cache best hit rate), each the mean over MoE layers.
  double final_specialisation = -1, final_srp = -1, final_sch = -1;
  /// Accuracy per task of RUN/eval_tasks.json (`mixdiff eval`, or `tasks.run` after training).
  std::map<std::string, double> task_acc;
  std::string config;          ///< the configuration (cell.json "config"; else the name)
  int64_t seed = -1;           ///< the cell's seed (cell.json values, else run.json), -1 unknown
  /// Validation NELBO over training: (tokens, training seconds without evaluation, NELBO).
  struct ValPoint {
    double tokens, train_s, nelbo;
  };
  std::vector<ValPoint> val_curve;
  /// Tokens / training seconds at which the validation NELBO first reached `target`, linearly
  /// interpolated between the evaluations around the crossing; NaN when it never did.
  double tokens_to(double target) const;
  double seconds_to(double target) const;
  /// Reads a run folder. Missing files leave fields at their defaults.
  static RunSummary read(const std::string& dir);
};

/// The runs of a sweep folder (subfolders with cell.json or run.json), in the sweep's order
/// (cell.json "index") or by name.
std::vector<RunSummary> read_sweep(const std::string& sweep_dir);

/// How a sweep's runs are grouped and compared: sweep.json's, or for a folder without one the
/// configurations and seeds its cells name.
struct SweepDesign {
  std::vector<std::string> keys;     ///< the varied dotted keys (the cell table's columns)
  std::vector<std::string> configs;  ///< configurations, in order
  std::vector<int64_t> seeds;        ///< the seeds every configuration is expected to run
  std::string baseline;              ///< empty: no paired comparison
  double target_val_nelbo = -1;      ///< > 0: tokens and seconds to reach it
  static SweepDesign read(const std::string& sweep_dir, const std::vector<RunSummary>& runs);
};

/// A rendered table: header and rows of text cells.
struct ResultTable {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

/// Per configuration: seeds run and missing, and each metric's mean ± 95% half-width.
ResultTable configuration_table(const std::vector<RunSummary>& runs, const SweepDesign& d);
/// Per configuration other than the baseline: the paired difference to the baseline over the
/// seeds both finished, "mean [lo, hi]", marked " *" when the interval excludes zero. Empty
/// without a baseline.
ResultTable paired_table(const std::vector<RunSummary>& runs, const SweepDesign& d);

/// results.csv (per configuration), cells.csv (per cell) and results.md of a sweep.
std::string results_csv(const std::vector<RunSummary>& runs, const SweepDesign& d);
std::string cells_csv(const std::vector<RunSummary>& runs, const std::vector<std::string>& keys);
std::string results_markdown(const std::vector<RunSummary>& runs, const SweepDesign& d);

/// report.html for one run (a folder with run.json) or a sweep folder; returns the file's path.
std::string write_report(const std::string& run_or_sweep_dir);

}  // namespace mixdiff
