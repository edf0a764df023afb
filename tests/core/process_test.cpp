// Child processes (core/process.h), shared by `sweep` and `launch`: this test binary spawns itself.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "core/process.h"
#include "support/support.h"

namespace mixdiff {
namespace {

ChildExit wait_for(pid_t pid) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < until) {
    if (auto e = poll_child()) {
      if (e->pid == pid) return *e;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ADD_FAILURE() << "child " << pid << " did not end";
  return {};
}

TEST(UnitProcess, SpawnsItselfWithArgumentsEnvironmentAndOutputFiles) {
  const std::string d = test::scratch_dir("process");
  setenv("MIXDIFF_PROCESS_TEST_DROP", "1", 1);
  auto env = inherited_environment({"MIXDIFF_PROCESS_TEST_DROP"});
  for (const auto& kv : env) EXPECT_NE(kv.rfind("MIXDIFF_PROCESS_TEST_DROP=", 0), 0u);
  unsetenv("MIXDIFF_PROCESS_TEST_DROP");
  const pid_t pid = spawn_self("test", {"--gtest_list_tests", "--gtest_filter=UnitProcess.*"}, env,
                               {d + "/out.log", d + "/err.log"});
  const ChildExit e = wait_for(pid);
  EXPECT_EQ(e.code, 0) << describe_exit(e.status);
  EXPECT_NE(test::read_text(d + "/out.log").find("SpawnsItselfWithArgumentsEnvironmentAndOutputFiles"),
            std::string::npos);
}

TEST(UnitProcess, ASignalledChildEndsWith128PlusTheSignal) {
  // The child (this binary running no test) is killed at once; SIGKILL cannot be caught, so it
  // ends by the signal unless it already finished.
  const pid_t pid = spawn_self("test", {"--gtest_filter=UnitProcess.Never*"}, inherited_environment());
  signal_children({-1, pid}, SIGKILL);
  const ChildExit e = wait_for(pid);
  if (WIFSIGNALED(e.status)) {
    EXPECT_EQ(e.code, 128 + SIGKILL);
    EXPECT_EQ(describe_exit(e.status).rfind("killed by signal 9", 0), 0u) << describe_exit(e.status);
  } else {
    EXPECT_EQ(e.code, 0);  // it finished before the signal arrived
  }
}

}  // namespace
}  // namespace mixdiff
