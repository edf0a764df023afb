#include "core/profile.h"

#include <mutex>

namespace mixdiff::profile {

std::atomic<bool> g_enabled{false};

namespace {
std::mutex g_mu;
std::map<std::string, double>& totals() {
  static std::map<std::string, double> t;
  return t;
}
}  // namespace

void add(const char* name, double seconds) {
  std::lock_guard<std::mutex> lock(g_mu);
  totals()[name] += seconds;
}

std::map<std::string, double> take() {
  std::lock_guard<std::mutex> lock(g_mu);
  auto out = totals();
  totals().clear();
  return out;
}

}  // namespace mixdiff::profile
