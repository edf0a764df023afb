#include "core/fault.h"

#include <chrono>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <thread>

namespace mixdiff::fault {

namespace {

const std::map<std::string, int64_t>& armed() {
  static const std::map<std::string, int64_t> m = [] {
    std::map<std::string, int64_t> out;
    const char* env = std::getenv("MIXDIFF_FAULT");
    if (!env) return out;
    std::stringstream ss(env);
    std::string item;
    while (std::getline(ss, item, ',')) {
      const auto eq = item.find('=');
      if (eq == std::string::npos) continue;
      try {
        out[item.substr(0, eq)] = std::stoll(item.substr(eq + 1));
      } catch (const std::exception&) {
      }
    }
    return out;
  }();
  return m;
}

}  // namespace

int64_t value(const char* name) {
  const auto& m = armed();
  if (m.empty()) return -1;
  auto it = m.find(name);
  return it == m.end() ? -1 : it->second;
}

void delay(const char* name) {
  const int64_t ms = value(name);
  if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

}  // namespace mixdiff::fault
