// One libFuzzer binary per target: compiled with -DMIXDIFF_FUZZ_TARGET="name" (fuzz/CMakeLists.txt).
// A non-InputError exception aborts, so that libFuzzer records the input as a crash.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "fuzz/targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string what;
  if (!mixdiff::fuzz::run_one(MIXDIFF_FUZZ_TARGET, data, size, &what)) {
    std::fprintf(stderr, "mixdiff fuzz %s: unexpected exception: %s\n", MIXDIFF_FUZZ_TARGET,
                 what.c_str());
    std::abort();
  }
  return 0;
}
