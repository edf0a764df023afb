#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite (all tiers) with CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --tests
tools/build.sh
cd build && ctest --output-on-failure -j 2
