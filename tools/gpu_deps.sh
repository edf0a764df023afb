#!/usr/bin/env bash
# Unpacks Debian 12's packages of the C++ dependencies (yaml-cpp, CLI11, nlohmann-json, GoogleTest,
# PCRE2) into .devcheck/root, for a machine that has a CUDA PyTorch but not these and no network
# (the GPU machine): run it here, carry .devcheck there, then
#   DEPS_PREFIX=.devcheck/root/usr tools/build_cuda.sh
#   export LD_LIBRARY_PATH=$PWD/.devcheck/root/usr/lib/x86_64-linux-gnu
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devcheck/debs .devcheck/root
cd .devcheck/debs
apt-get download -q libyaml-cpp-dev libyaml-cpp0.7 libcli11-dev nlohmann-json3-dev libgtest-dev \
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 2>/dev/null
for f in *.deb; do dpkg -x "$f" ../root; done
echo "gpu_deps: unpacked $(ls *.deb | wc -l) packages into .devcheck/root"
