// The training loop's logging interval (Trainer::fit): every train.log_every steps, the line
// printed to the log and the record appended to metrics.jsonl, from what the steps since the
// previous one returned:
//   step N/S | loss (mean over the interval's finite steps) | lr | grad | tok/s | elapsed | eta
//   | one field per routing loss
// and in the record: step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s, aux (routing-loss
// means), world_size and allreduce_s_per_step under data parallelism. Throughput counts training
// time only: the trainer restarts the clock after evaluation and checkpoints.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mixdiff {

class MetricsLogger {
 public:
  /// `aux_names`: the routing losses, in the order of the steps' aux values; `total_steps`:
  /// train.steps; `first_step`: the step the run (or its resumption) starts at.
  MetricsLogger(std::vector<std::string> aux_names, int64_t total_steps, int64_t first_step);

  /// One step: its mean loss (counted only when `finite`), the tokens it consumed on every rank,
  /// its routing-loss values and its seconds in gradient communication.
  void add(double loss, int64_t tokens, bool finite, const std::vector<double>& aux, double comm_s);

  struct Record {
    std::string line;         ///< for the log
    nlohmann::json metrics;   ///< for metrics.jsonl (the trainer adds moe and eval)
  };
  /// Closes the interval at `step` (steps done): `total_tokens` of the run so far, the learning
  /// rate and gradient norm of the latest step, the run's elapsed seconds, the world size.
  Record take(int64_t step, int64_t total_tokens, double lr, double grad_norm, double elapsed_s,
              int64_t world);
  /// Evaluation and checkpoints are not training throughput.
  void restart_clock() { last_ = clock::now(); }

 private:
  using clock = std::chrono::steady_clock;
  std::vector<std::string> aux_names_;
  int64_t total_steps_, first_step_;
  clock::time_point start_, last_;
  double loss_ = 0, comm_s_ = 0;
  int64_t steps_ = 0, tokens_ = 0;
  std::vector<double> aux_;
};

/// "1h02m" from an hour on, else "4m05s"; "?" when not finite or negative.
std::string format_duration(double seconds);

}  // namespace mixdiff
