// Fault injection for the reliability tests (tests/reliability/): MIXDIFF_FAULT="name=value,..."
// in the environment arms named fault points; unset (every production run) they cost one
// cached lookup. Points: nan_loss_at_step=N (the loss of 1-based step N becomes NaN),
// ckpt_file_delay_ms=M (sleep before each file of a checkpoint is written, a window for kill -9),
// generate_delay_ms=M (sleep before each sampler forward, a window for SIGTERM).
#pragma once

#include <cstdint>

namespace mixdiff::fault {

/// The value armed for `name`, or -1 when it is not armed.
int64_t value(const char* name);

/// Sleeps for the milliseconds armed for `name` (nothing when not armed).
void delay(const char* name);

}  // namespace mixdiff::fault
