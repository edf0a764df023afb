// Child processes of this program (`sweep` runs its cells, `launch` its workers): spawn this
// executable with arguments and an environment, poll for children that ended, send signals.
// POSIX only; no LibTorch.
//
//   pid_t pid = spawn_self({"train", "recipe.yaml"}, inherited_environment({"RANK"}), {...});
//   while (auto e = poll_child()) ...      // e->pid ended with e->code
#pragma once

#include <sys/types.h>

#include <optional>
#include <set>
#include <string>
#include <vector>

namespace mixdiff {

/// This program's path (/proc/self/exe); throws std::runtime_error naming `who` when unknown.
std::string self_exe(const std::string& who);

/// This process's environment without the variables named in `drop`.
std::vector<std::string> inherited_environment(const std::set<std::string>& drop = {});

/// Where a child's stdout and stderr go ("" keeps the parent's).
struct ChildOutput {
  std::string stdout_path;  ///< appended to
  std::string stderr_path;  ///< truncated first
};

/// Starts this program with `args` (without argv[0]) and `env` ("KEY=value"); throws
/// std::runtime_error naming `who` when the spawn fails.
pid_t spawn_self(const std::string& who, const std::vector<std::string>& args,
                 const std::vector<std::string>& env, const ChildOutput& out = {});

/// A child that ended: its pid, the raw wait status, and the shell-style exit code
/// (the exit status, or 128 + the signal that killed it).
struct ChildExit {
  pid_t pid = -1;
  int status = 0;
  int code = 0;
};

/// A child that has ended, if any (does not block).
std::optional<ChildExit> poll_child();

/// Sends `sig` to every pid > 0 of `pids`.
void signal_children(const std::vector<pid_t>& pids, int sig);

/// "exit status N" or "killed by signal N (name)".
std::string describe_exit(int status);

}  // namespace mixdiff
