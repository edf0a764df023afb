#include "core/process.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <fcntl.h>

#include <cstring>
#include <stdexcept>

#include "core/errors.h"

extern char** environ;

namespace mixdiff {

std::string self_exe(const std::string& who) {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) throw std::runtime_error(who + ": cannot find this program's path (/proc/self/exe)");
  buf[n] = '\0';
  return buf;
}

std::vector<std::string> inherited_environment(const std::set<std::string>& drop) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    if (!drop.count(kv.substr(0, kv.find('=')))) env.push_back(kv);
  }
  return env;
}

pid_t spawn_self(const std::string& who, const std::vector<std::string>& args,
                 const std::vector<std::string>& env, const ChildOutput& out) {
  const std::string exe = self_exe(who);
  std::vector<std::string> argv_s{exe};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<std::string> env_s = env;
  std::vector<char*> argv, envp;
  for (auto& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  for (auto& s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (!out.stdout_path.empty()) {
    posix_spawn_file_actions_addopen(&fa, 1, out.stdout_path.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0644);
  }
  if (!out.stderr_path.empty()) {
    posix_spawn_file_actions_addopen(&fa, 2, out.stderr_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
  }
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error(str(who, ": could not start ", exe, ": ", std::strerror(rc)));
  return pid;
}

std::optional<ChildExit> poll_child() {
  int status = 0;
  const pid_t pid = waitpid(-1, &status, WNOHANG);
  if (pid <= 0) return std::nullopt;
  ChildExit e;
  e.pid = pid;
  e.status = status;
  e.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return e;
}

void signal_children(const std::vector<pid_t>& pids, int sig) {
  for (pid_t p : pids) {
    if (p > 0) kill(p, sig);
  }
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return str("exit status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return str("killed by signal ", WTERMSIG(status), " (", strsignal(WTERMSIG(status)), ")");
  }
  return str("status ", status);
}

}  // namespace mixdiff
