#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite (all tiers) with CTest, then
# the parsers of user files under AddressSanitizer + UndefinedBehaviorSanitizer through their
# fuzz targets: the regression corpus plus 20,000 generated inputs each (tools/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --tests
tools/build.sh
(cd build && ctest --output-on-failure -j 2)
FUZZ_RUNS=20000 tools/fuzz.sh
