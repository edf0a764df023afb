#!/usr/bin/env bash
# Installs what is missing, builds, and runs the tests on both LibTorch versions:
#   1. Debian's LibTorch 1.13 (build/): the whole suite, every tier, with CTest;
#   2. the parsers of user files under AddressSanitizer + UndefinedBehaviorSanitizer through their
#      fuzz targets: the regression corpus plus 20,000 generated inputs each (tools/fuzz.sh);
#   3. PyTorch 2.x's CUDA LibTorch from PyPI (.venv/, build-torch2/): the unit, component and
#      round-trip tiers, on the CPU (the CUDA-only tests skip without a GPU).
# The parity tests run the PyTorch reference under both PyTorch versions (MIXDIFF_REQUIRE_TORCH2=1
# makes a missing .venv a failure rather than a skip).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
tools/setup.sh --tests --torch2
export MIXDIFF_REQUIRE_TORCH2=1
tools/build.sh
(cd build && ctest --output-on-failure -j 2)
FUZZ_RUNS=20000 tools/fuzz.sh
MIXDIFF_TORCH=2 tools/build.sh
(cd build-torch2 && ctest --output-on-failure -j 2 -L 'unit|component|roundtrip')
echo "test.sh: LibTorch 1.13 (all tiers), fuzz, LibTorch $(.venv/bin/python -c \
  'import torch; print(torch.__version__)' 2>/dev/null) (unit, component, round-trip) passed" \
  "in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
