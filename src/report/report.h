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
// Results (results.csv / results.md of a sweep) are one row per cell, failed cells included with
// their error.
#pragma once

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
  /// Reads a run folder. Missing files leave fields at their defaults.
  static RunSummary read(const std::string& dir);
};

/// The runs of a sweep folder (subfolders with cell.json or run.json), in the sweep's order
/// (cell.json "index") or by name.
std::vector<RunSummary> read_sweep(const std::string& sweep_dir);

/// results.csv and results.md of a sweep: one row per run; `keys` are the varied dotted keys.
std::string results_csv(const std::vector<RunSummary>& runs, const std::vector<std::string>& keys);
std::string results_markdown(const std::vector<RunSummary>& runs,
                             const std::vector<std::string>& keys);

/// report.html for one run (a folder with run.json) or a sweep folder; returns the file's path.
std::string write_report(const std::string& run_or_sweep_dir);

}  // namespace mixdiff
