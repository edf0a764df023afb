// Test entry point: seeds LibTorch, and rejects test suites whose names belong to no tier
// (Unit, Component, Roundtrip, E2E, Distributed), so that no test silently escapes the CTest tier runs.
// A crash (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) prints the running test and a backtrace
// before the process dies as it would have: a machine without a debugger (the GPU box) still
// says where. Symbols come from the binary's exported table (linked with ENABLE_EXPORTS);
// `addr2line -e mixdiff_tests` or c++filt turn the frames into names.
#include <execinfo.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#define MIXDIFF_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MIXDIFF_TEST_ASAN 1
#endif
#endif

namespace {

char g_current_test[512] = "(no test running)";

void write_str(const char* s) {
  const ssize_t n = static_cast<ssize_t>(std::strlen(s));
  if (write(STDERR_FILENO, s, static_cast<size_t>(n)) != n) return;
}

void on_crash(int sig) {
  write_str("\n*** fatal signal ");
  write_str(strsignal(sig));
  write_str(" in test ");
  write_str(g_current_test);
  write_str("; backtrace:\n");
  void* frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}

class CurrentTest : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo& t) override {
    std::snprintf(g_current_test, sizeof g_current_test, "%s.%s", t.test_suite_name(), t.name());
  }
  void OnTestEnd(const ::testing::TestInfo&) override {
    std::snprintf(g_current_test, sizeof g_current_test, "(between tests)");
  }
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const auto* unit = ::testing::UnitTest::GetInstance();
  for (int i = 0; i < unit->total_test_suite_count(); ++i) {
    const std::string name = unit->GetTestSuite(i)->name();
    bool ok = false;
    for (const char* tier : {"Unit", "Component", "Roundtrip", "E2E", "Distributed"}) {
      ok = ok || name.rfind(tier, 0) == 0;
    }
    if (!ok) {
      std::fprintf(stderr, "test suite '%s' belongs to no tier (Unit*, Component*, Roundtrip*, E2E*, Distributed*)\n",
                   name.c_str());
      return 1;
    }
  }
  ::testing::UnitTest::GetInstance()->listeners().Append(new CurrentTest);
  // Under a sanitizer the runtime's own report is better: leave its handlers alone.
#ifndef MIXDIFF_TEST_ASAN
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) signal(sig, on_crash);
#endif
  return RUN_ALL_TESTS();
}
