#include "train/metrics_logger.h"

#include <cmath>
#include <cstdio>
#include <utility>

namespace mixdiff {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(t / 3600),
                  static_cast<long long>(t % 3600 / 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", static_cast<long long>(t / 60),
                  static_cast<long long>(t % 60));
  }
  return buf;
}

MetricsLogger::MetricsLogger(std::vector<std::string> aux_names, int64_t total_steps,
                             int64_t first_step)
    : aux_names_(std::move(aux_names)),
      total_steps_(total_steps),
      first_step_(first_step),
      start_(clock::now()),
      last_(start_),
      aux_(aux_names_.size(), 0.0) {}

void MetricsLogger::add(double loss, int64_t tokens, bool finite, const std::vector<double>& aux,
                        double comm_s) {
  comm_s_ += comm_s;
  for (size_t i = 0; i < aux.size() && i < aux_.size(); ++i) aux_[i] += aux[i];
  if (finite) {
    loss_ += loss;
    ++steps_;
  }
  tokens_ += tokens;
}

MetricsLogger::Record MetricsLogger::take(int64_t step, int64_t total_tokens, double lr,
                                          double grad_norm, double elapsed_s, int64_t world) {
  const auto now = clock::now();
  const double dt = std::chrono::duration<double>(now - last_).count();
  const double tps = dt > 0 ? static_cast<double>(tokens_) / dt : 0;
  const double per_step = std::chrono::duration<double>(now - start_).count() /
                          static_cast<double>(step - first_step_);
  const double steps = static_cast<double>(steps_);
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "step %6lld/%lld | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | elapsed %s | "
                "eta %s",
                static_cast<long long>(step), static_cast<long long>(total_steps_),
                steps_ > 0 ? loss_ / steps : std::nan(""), lr, grad_norm, tps,
                format_duration(elapsed_s).c_str(),
                format_duration(per_step * static_cast<double>(total_steps_ - step)).c_str());
  Record r;
  r.line = buf;
  nlohmann::json aux_json = nlohmann::json::object();
  for (size_t i = 0; i < aux_names_.size(); ++i) {
    const double v = aux_[i] / steps;
    char b[64];
    std::snprintf(b, sizeof(b), " | %s %.4g", aux_names_[i].c_str(), v);
    r.line += b;
    aux_json[aux_names_[i]] = v;
    aux_[i] = 0;
  }
  r.metrics = {{"step", step},         {"loss", loss_ / steps},      {"lr", lr},
               {"grad_norm", grad_norm}, {"tokens", total_tokens}, {"tokens_per_s", tps},
               {"elapsed_s", elapsed_s}};
  if (!aux_names_.empty()) r.metrics["aux"] = aux_json;
  if (world > 1) {
    r.metrics["world_size"] = world;
    r.metrics["allreduce_s_per_step"] = comm_s_ / steps;
  }
  comm_s_ = 0;
  loss_ = 0;
  steps_ = 0;
  tokens_ = 0;
  last_ = now;
  return r;
}

}  // namespace mixdiff
