#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer build of the whole project (g++,
# -DMIXDIFF_SANITIZE=ON, in build-asan/) running the unit, component and round-trip tiers:
# parsers, routers, MoE layers, losses, models, samplers, optimizers. LibTorch itself is not
# instrumented; its one-time allocations at exit are not reported (detect_leaks=0).
#   tools/sanitize.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-2}
cmake -S . -B build-asan -G Ninja -DMIXDIFF_SANITIZE=ON -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build-asan -j "$jobs" --target mixdiff_tests mixdiff > /dev/null
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
./build-asan/tests/mixdiff_tests --gtest_filter='Unit*:Component*:Roundtrip*' --gtest_brief=1
echo "sanitize: unit, component and round-trip tiers clean under ASan + UBSan"
