#!/usr/bin/env bash
# Configures and builds MixDiff into build/ (Release, Ninja, ccache when installed) against
# Debian's LibTorch 1.13 (CPU).
#   MIXDIFF_TORCH=2 tools/build.sh   builds into build-torch2/ against the LibTorch of PyTorch 2.x in
#                                    .venv (tools/setup.sh --torch2): the CUDA wheel, so
#                                    -DMIXDIFF_USE_CUDA=ON with this machine's CUDA toolkit; C++20
#                                    for LibTorch 2.10+; its CPU tests run here, without a GPU.
# Extra arguments go to CMake, e.g. tools/build.sh -DMIXDIFF_USE_PCH=ON
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${MIXDIFF_TORCH:-}" = 2 ]; then
  if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
    echo "error: MIXDIFF_TORCH=2 needs PyTorch 2.x in .venv: run tools/setup.sh --torch2" >&2
    exit 2
  fi
  prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
  # The wheel's CUDA libraries (NCCL, cuDNN, ...) sit in site-packages/nvidia/*/lib, where its
  # libtorch_cuda.so's RPATH finds them at run time; the linker must take them, not the older
  # ones of the machine's toolkit, when it checks libtorch_cuda.so's references.
  nvidia=$(cd "$prefix/../../.." && ls -d "$PWD"/nvidia/*/lib 2>/dev/null | paste -sd: -)
  cmake -S . -B build-torch2 -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    -DMIXDIFF_USE_CUDA=ON -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$nvidia" "$@" >/dev/null
  cmake --build build-torch2 -j "$(nproc)"
  exit 0
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j "$(nproc)"
