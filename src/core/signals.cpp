#include "core/signals.h"

#include <csignal>
#include <cstring>
#include <string>
#include <unistd.h>

namespace mixdiff {

std::atomic<int> g_stop_signal{0};

namespace {

std::atomic<bool> g_throw{false};

void on_stop_signal(int sig) {
  if (g_stop_signal.load() != 0) _exit(128 + sig);  // second signal: stop now
  g_stop_signal.store(sig);
}

}  // namespace

void install_stop_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

Interrupted::Interrupted(int sig)
    : std::runtime_error(std::string("interrupted by signal ") + std::to_string(sig) + " (" +
                         strsignal(sig) + ")"),
      signal(sig) {}

void enable_interrupt_exceptions() { g_throw.store(true); }

void throw_if_interrupted() {
  const int sig = g_stop_signal.load();
  if (sig != 0 && g_throw.load()) throw Interrupted(sig);
}

}  // namespace mixdiff
