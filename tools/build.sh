#!/usr/bin/env bash
# Configures and builds MixDiff into build/ (Release, Ninja, ccache when installed).
# Extra arguments go to CMake, e.g. tools/build.sh -DMIXDIFF_USE_PCH=ON
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j "$(nproc)"
