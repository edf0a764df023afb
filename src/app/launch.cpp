// `mixdiff launch`: a torchrun-style launcher. It starts --nproc-per-node workers of this same
// binary on this node with torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, GROUP_RANK), so the workers rendezvous through
// c10d's TCPStore served by global rank 0. Several nodes run one launcher each with the same
// --nnodes, --master-addr and --master-port and their own --node-rank.
//
// Supervision: the first worker that exits non-zero (or is killed) is named with its rank and
// status, the others get SIGTERM, and after --grace seconds SIGKILL; the launcher exits non-zero.
// SIGINT/SIGTERM to the launcher are forwarded once to every worker (which checkpoint and stop
// together), and the launcher returns 128 + signal when they are done.
//
// CPU threads: unless OPENBLAS_NUM_THREADS is set, each worker gets cores / nproc-per-node BLAS
// threads (at least 1), so workers do not oversubscribe the cores.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>
#include <vector>

#include "app/app.h"
#include "core/errors.h"
#include "core/process.h"

extern char** environ;

namespace mixdiff {

namespace {

std::atomic<int> g_launcher_signal{0};

void on_launcher_signal(int sig) { g_launcher_signal.store(sig); }

}  // namespace

int cmd_launch(const LaunchArgs& a) {
  if (a.nproc_per_node < 1) throw ConfigError("launch: --nproc-per-node must be at least 1");
  if (a.nnodes < 1) throw ConfigError("launch: --nnodes must be at least 1");
  if (a.node_rank < 0 || a.node_rank >= a.nnodes) {
    throw ConfigError(str("launch: --node-rank ", a.node_rank, " outside 0..", a.nnodes - 1));
  }
  if (a.master_port < 1 || a.master_port > 65535) {
    throw ConfigError(str("launch: --master-port ", a.master_port, " is not a port number"));
  }
  if (a.command.empty()) {
    throw ConfigError("launch: expected the worker command after '--', e.g. -- train RECIPE");
  }
  const int world = a.nnodes * a.nproc_per_node;
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const int blas_threads = std::max(1, static_cast<int>(cores) / a.nproc_per_node);

  struct sigaction sa {};
  sa.sa_handler = on_launcher_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  std::vector<pid_t> pids(static_cast<size_t>(a.nproc_per_node), -1);
  std::vector<int> rank_of(pids.size());
  for (int i = 0; i < a.nproc_per_node; ++i) {
    const int rank = a.node_rank * a.nproc_per_node + i;
    rank_of[static_cast<size_t>(i)] = rank;
    std::vector<std::string> env = inherited_environment(
        {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "GROUP_RANK"});
    env.push_back(str("RANK=", rank));
    env.push_back(str("LOCAL_RANK=", i));
    env.push_back(str("WORLD_SIZE=", world));
    env.push_back(str("LOCAL_WORLD_SIZE=", a.nproc_per_node));
    env.push_back(str("GROUP_RANK=", a.node_rank));
    env.push_back("MASTER_ADDR=" + a.master_addr);
    env.push_back(str("MASTER_PORT=", a.master_port));
    if (!std::getenv("OPENBLAS_NUM_THREADS")) env.push_back(str("OPENBLAS_NUM_THREADS=", blas_threads));
    pid_t pid = -1;
    try {
      pid = spawn_self("launch", a.command, env);
    } catch (const std::runtime_error&) {
      signal_children(pids, SIGKILL);
      throw std::runtime_error(str("launch: could not start worker rank ", rank));
    }
    pids[static_cast<size_t>(i)] = pid;
  }
  std::cerr << "launch: node " << a.node_rank << " of " << a.nnodes << ", " << world
            << " ranks, master " << a.master_addr << ":" << a.master_port << ";";
  for (size_t i = 0; i < pids.size(); ++i) {
    std::cerr << " rank " << rank_of[i] << " pid " << pids[i] << (i + 1 < pids.size() ? "," : "");
  }
  std::cerr << std::endl;

  int result = 0;
  int running = a.nproc_per_node;
  bool stopping = false;  // a worker failed: the others were told to stop
  int forwarded = 0;      // signal forwarded to the workers
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (running > 0) {
    const int sig = g_launcher_signal.load();
    if (sig != 0 && forwarded == 0) {
      forwarded = sig;
      std::cerr << "launch: signal " << sig << ": asking every worker to checkpoint and stop"
                << std::endl;
      signal_children(pids, SIGINT);
    }
    if (const auto e = poll_child()) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (pids[i] != e->pid) continue;
        pids[i] = -1;
        --running;
        const int status = e->status;
        const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        const bool stopped_by_us =
            forwarded != 0 && WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGINT;
        if (!ok && !stopped_by_us && !stopping) {
          std::cerr << "launch: rank " << rank_of[i] << " (pid " << e->pid << ") ended with "
                    << describe_exit(status) << "; stopping the other " << running
                    << " worker(s)" << std::endl;
          result = e->code;
          stopping = true;
          signal_children(pids, SIGTERM);
          deadline = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(a.grace_s * 1000));
        }
      }
      continue;
    }
    if (stopping && std::chrono::steady_clock::now() > deadline) {
      signal_children(pids, SIGKILL);
      deadline = std::chrono::steady_clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (result != 0) return result;
  if (forwarded != 0) return 128 + forwarded;
  return 0;
}

}  // namespace mixdiff
