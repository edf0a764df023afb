// Error types of MixDiff.
//
// Three tiers (style.md guideline 10):
//  - InputError and its subclasses: something the user gave us is wrong (a recipe key, a CLI
//    value, a data file, a checkpoint, a tokenizer file). The message names what, where and what
//    was expected, fits on one line, and is printed by the CLI as `error: <message>` before a
//    non-zero exit.
//  - TORCH_CHECK at module boundaries for shape/type errors from callers.
//  - TORCH_INTERNAL_ASSERT for invariants (bugs).
// Libraries never exit; only the CLI's main() catches and returns a status.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mixdiff {

/// Any error caused by user input. The message is the whole story (one line).
class InputError : public std::runtime_error {
 public:
  explicit InputError(const std::string& msg) : std::runtime_error(msg) {}
};

/// A recipe key, a --set override or a CLI value is unknown, mistyped or missing.
class ConfigError : public InputError {
 public:
  using InputError::InputError;
};

/// A data file (corpus, token shard, tokenizer file) is missing or malformed.
class DataError : public InputError {
 public:
  using InputError::InputError;
};

/// A checkpoint is missing, truncated, corrupt or does not fit the model.
class CheckpointError : public InputError {
 public:
  using InputError::InputError;
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <class T, class... Rest>
void append_all(std::ostringstream& os, T&& first, Rest&&... rest) {
  os << std::forward<T>(first);
  append_all(os, std::forward<Rest>(rest)...);
}
}  // namespace detail

/// Concatenates the streamable arguments into a string: str("got ", 3, " items").
template <class... Args>
std::string str(Args&&... args) {
  std::ostringstream os;
  detail::append_all(os, std::forward<Args>(args)...);
  return os.str();
}

}  // namespace mixdiff
