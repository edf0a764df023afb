// Sweep files (recipes/sweeps/*.yaml): a base recipe plus axes over dotted recipe keys, expanded
// into named cells. No LibTorch here; `mixdiff sweep` (src/app/sweep_cmd.cpp) validates and runs
// the cells.
//
//   name: balancing                    # runs go to runs/<name>/<cell>/
//   base: ../quickstart_moe.yaml       # relative to the sweep file
//   set: {train.steps: 300}            # overrides for every cell (optional)
//   axes:                              # the cells are the product of all axes (and seeds)
//     - grid: {model.moe.router.top_k: [2, 4], model.moe.d_expert: [176, 88]}   # product
//     - zip:  {optim.lr: [0.002, 0.003], lr_schedule.warmup_steps: [50, 100]}  # side by side
//     - list:                          # explicit override sets, each with a label
//         - {label: none, set: {losses: [{kind: masked_diffusion_elbo}]}}
//         - {label: global, set: {losses.1.scope: global}}
//   seeds: [0, 1]                      # an axis over the recipe key `seed` (optional)
//   cell_name: "{label}_k{model.moe.router.top_k}_s{seed}"   # optional template
//   budget: {tokens: 1.2e6}            # or {flops: 3e15}: train.steps per cell (optional)
//   baseline: global                   # the configuration the others are compared to (optional)
//   target: {val_nelbo: 6.0}           # tokens and time to reach this NELBO (optional)
//
// Cells that differ only in `seed` are one configuration, named like a cell without its seed
// ("global", "top_k-2_d_expert-176"; "base" when only the seed varies). Results show each
// configuration's mean over its seeds with a 95% Student-t interval and, with `baseline:`, every
// other configuration's paired difference to the baseline (src/report/stats.h).
//
// Placeholders of cell_name are `label`, `seed` and any varied dotted key; the default joins the
// labels and the varied values. Values are YAML (scalars, lists, maps) and are applied exactly
// like `--set key=value`.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mixdiff {

struct SweepCell {
  int index = 0;
  std::string name;
  /// Every override of this cell in order (common `set`, then the axes, then the seed), as
  /// (dotted key, YAML text in flow style).
  std::vector<std::pair<std::string, std::string>> overrides;
  /// The varied keys and their values (flow YAML), for plans and tables; `label` when labelled.
  std::map<std::string, std::string> values;
  std::string config;  ///< the configuration: the cell without its seed
};

struct SweepSpec {
  std::string file;  ///< the sweep file
  std::string name;
  std::string base;  ///< absolute path of the base recipe
  std::vector<std::string> varied_keys;  ///< in axis order (label and seed included when present)
  std::vector<SweepCell> cells;
  std::vector<std::string> configs;  ///< configuration names, in cell order
  std::vector<int64_t> seeds;        ///< the `seeds:` list (empty without one)
  std::string baseline;              ///< `baseline:` (empty without one)
  /// `target: {val_nelbo: X}`: results add the tokens and training seconds each run took to
  /// first reach a validation NELBO of X (interpolated between evaluations).
  std::optional<double> target_val_nelbo;
  std::optional<double> budget_tokens, budget_flops;

  /// Parses and expands `file`. Unknown keys, empty or ragged axes, bad templates and duplicate
  /// cell names throw ConfigError naming file, line and key.
  static SweepSpec load(const std::string& file);
  /// train.steps of a cell under the budget: round(tokens / tokens_per_step), or
  /// round(flops / (flops_per_token x tokens_per_step)) with the cell's planned training FLOPs
  /// per token; at least 1. `fallback` without a budget.
  int64_t budget_steps(double tokens_per_step, double flops_per_token, int64_t fallback) const;
};

/// Flow-style, single-line YAML of a YAML text ("{kind: aux_free, rate: 0.001}").
std::string yaml_flow(const std::string& yaml_text);

}  // namespace mixdiff
