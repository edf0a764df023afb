// A wall-clock profile of the training step by component (attention, routing, dispatch, experts,
// dense FFN, loss, backward, optimizer, data), for `mixdiff bench train --profile`. Off unless
// enabled: a scope then costs one relaxed atomic load. Forward components are measured inside the
// forward; the backward pass is one component (autograd runs it).
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <string>

namespace mixdiff::profile {

extern std::atomic<bool> g_enabled;

/// Adds `seconds` to component `name`.
void add(const char* name, double seconds);
/// The accumulated seconds per component (and resets them).
std::map<std::string, double> take();

class Scope {
 public:
  explicit Scope(const char* name) : name_(name) {
    if (g_enabled.load(std::memory_order_relaxed)) start_ = std::chrono::steady_clock::now(), on_ = true;
  }
  ~Scope() { stop(); }
  /// Ends the scope early (the destructor then adds nothing).
  void stop() {
    if (on_) {
      add(name_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
      on_ = false;
    }
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  const char* name_;
  bool on_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace mixdiff::profile
