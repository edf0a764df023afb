// SIGINT/SIGTERM handling shared by every command. The handlers only record the signal; each
// command decides where to stop: the trainer checkpoints at the end of the step, `generate` and
// `eval` (after enable_interrupt_exceptions) throw Interrupted at the next forward, so that they
// exit cleanly with nothing half-written. A second signal exits at once.
#pragma once

#include <atomic>
#include <stdexcept>

namespace mixdiff {

/// The signal number received (0: none).
extern std::atomic<int> g_stop_signal;

/// Installs the SIGINT/SIGTERM handlers.
void install_stop_handlers();

/// Thrown by throw_if_interrupted in commands that enabled it.
struct Interrupted : std::runtime_error {
  explicit Interrupted(int sig);
  int signal;
};

/// Makes throw_if_interrupted throw once a stop signal arrived (generate, eval).
void enable_interrupt_exceptions();
/// Called between forwards by samplers and evaluation loops.
void throw_if_interrupted();

}  // namespace mixdiff
