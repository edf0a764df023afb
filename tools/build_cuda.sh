#!/usr/bin/env bash
# Builds MixDiff for CUDA against the LibTorch inside this machine's PyTorch (2.x with CUDA), in
# build-cuda/: -DMIXDIFF_USE_CUDA=ON (NCCL process group, bf16 autocast, `runtime.device: cuda`).
# Needs the CUDA toolkit that PyTorch's CMake config looks for, g++, cmake, ninja, yaml-cpp,
# CLI11, nlohmann-json, GoogleTest and PCRE2 (header: PCRE2_INCLUDE_DIR=... when libpcre2-dev is
# missing; or DEPS_PREFIX, below).
#   tools/build_cuda.sh [extra cmake args]      PYTHON=/path/to/python3 to pick the PyTorch
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
prefix=$($py -c 'import torch; print(torch.utils.cmake_prefix_path)')
# A machine without the C++ dependencies (the GPU machine): DEPS_PREFIX=.devcheck/root/usr after
# tools/gpu_deps.sh unpacked Debian 12's packages there.
if [ -n "${DEPS_PREFIX:-}" ]; then prefix="$prefix;$(cd "$DEPS_PREFIX" && pwd)"; fi
extra=()
[ -n "${PCRE2_INCLUDE_DIR:-}" ] && extra+=("-DMIXDIFF_PCRE2_INCLUDE_DIR=$PCRE2_INCLUDE_DIR")
cmake -S . -B build-cuda -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DMIXDIFF_USE_CUDA=ON \
  -DMIXDIFF_CCACHE=OFF "${extra[@]}" "$@"
cmake --build build-cuda -j "$(nproc)" -- -k 0
