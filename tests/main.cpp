// Test entry point: seeds LibTorch, and rejects test suites whose names belong to no tier
// (Unit, Component, Roundtrip, E2E, Distributed), so that no test silently escapes the CTest tier runs.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

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
  return RUN_ALL_TESTS();
}
