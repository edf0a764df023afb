#!/usr/bin/env bash
# Installs the Debian 12 packages MixDiff needs (idempotent; silent when everything is there).
#   build:   g++, cmake, ninja, pkg-config, ccache, LibTorch 1.13 (CPU), Gloo headers (c10d's
#            ProcessGroupGloo includes them), yaml-cpp, CLI11,
#            nlohmann-json, PCRE2, GoogleTest
#   speed:   OpenBLAS (pthread). Debian's default reference BLAS makes every matmul 24-30x
#            slower; installing libopenblas0-pthread switches libblas.so.3 to it.
#   data:    the built-in English corpora: bible-kjv (KJV Bible), fortunes, wordnet-base
#   tests:   with --tests also Debian's chromium (the report test opens report.html headless),
#            python3-torch + python3-yaml (the PyTorch reference of tools/reference/, used by
#            the parity test; it imports only under /usr/bin/python3), and clang with its
#            libFuzzer/sanitizer runtimes (tools/fuzz.sh)
#   torch2:  with --torch2 also PyTorch 2.x from PyPI (the newest it serves; the CUDA wheel, which
#            runs on the CPU too) in the project-local virtual environment .venv/, for the
#            LibTorch 2.x build (MIXDIFF_TORCH=2 tools/build.sh), and the tests' Python packages
#            pinned in tools/requirements-tests.txt (lm-eval)
# Usage: tools/setup.sh [--tests] [--torch2]   (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."

tests=0
torch2=0
for a in "$@"; do
  case "$a" in
    --tests) tests=1 ;;
    --torch2) torch2=1 ;;
    *) echo "error: tools/setup.sh: unknown option '$a' (expected --tests or --torch2)" >&2; exit 2 ;;
  esac
done

PACKAGES=(
  g++ cmake ninja-build pkg-config ccache
  libtorch-dev libgloo-dev libyaml-cpp-dev libcli11-dev nlohmann-json3-dev libpcre2-dev libgtest-dev
  libopenblas0-pthread libblas-dev
  bible-kjv fortunes wordnet-base
)

if [ "$tests" = 1 ]; then PACKAGES+=(chromium python3-torch python3-yaml clang libclang-rt-14-dev); fi
if [ "$torch2" = 1 ]; then PACKAGES+=(python3-venv); fi

install_torch2() {
  [ "$torch2" = 1 ] || return 0
  if ! .venv/bin/python -c 'import torch, yaml, numpy' >/dev/null 2>&1; then
    echo "setup: installing PyTorch 2.x from PyPI into .venv (several GB)"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch pyyaml numpy  # numpy and pyyaml: the PyTorch reference
    echo "setup: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)"
  fi
  # The tests' Python packages (tools/requirements-tests.txt), when a pinned one is missing.
  if ! .venv/bin/python - <<'PY' >/dev/null 2>&1
import importlib.metadata as m, sys
for line in open("tools/requirements-tests.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, version = line.partition("==")
    if m.version(name) != version:
        sys.exit(1)
PY
  then
    echo "setup: installing tools/requirements-tests.txt into .venv"
    .venv/bin/pip install -q -r tools/requirements-tests.txt
  fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then install_torch2; exit 0; fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: tools/setup.sh must install ${missing[*]}: run it as root" >&2
    exit 1
  fi
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
install_torch2
