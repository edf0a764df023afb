#!/usr/bin/env bash
# The GPU machine's checks in one run: the CUDA build (tools/build_cuda.sh), the test suite on
# it (CUDA-only tests included; the Python parity test skips without /usr/bin/python3's torch,
# the Gloo tests without Gloo headers), then `mixdiff bench train` for the dense and MoE GPU
# recipes. Results go to $OUT (or build-cuda/gpu_check/) as JSON and logs.
#   tools/gpu_check.sh [bench steps]     REF=1 also runs the PyTorch reference (eager; and
#                                         with COMPILE=1 torch.compile) on the same recipes; SKIP_BUILD=1 and
#                                         SKIP_TESTS=1 reuse a build of this machine
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build-cuda/gpu_check}
steps=${1:-10}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpu.txt"
t0=$(date +%s)
if [ "${SKIP_BUILD:-0}" = 1 ]; then :; elif ! tools/build_cuda.sh > "$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -60
  echo "gpu_check: build failed after $(( $(date +%s) - t0 )) s"
  exit 1
fi
echo "gpu_check: built in $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  ./build-cuda/tests/mixdiff_tests --gtest_filter='Unit*:Component*:Roundtrip*:*Cuda*' --gtest_brief=1 \
    > "$out/tests.log" 2>&1; echo "tests exit $?"; grep -E "FAILED|PASSED|SKIPPED|Failure" "$out/tests.log" | head -40
  # A crash: the test and its frames (tests/main.cpp prints them), named with addr2line.
  if grep -q "fatal signal" "$out/tests.log"; then
    grep -m1 "fatal signal" "$out/tests.log"
    grep -A40 "fatal signal" "$out/tests.log" | grep -o "mixdiff_tests(+0x[0-9a-f]*)" |
      grep -o "0x[0-9a-f]*" | xargs -r addr2line -f -C -e build-cuda/tests/mixdiff_tests |
      paste - - | head -30
  fi
fi
for r in recipes/gpu/dense_300m.yaml recipes/gpu/moe_300m_active.yaml; do
  n=$(basename "$r" .yaml)
  timeout 150 ./build-cuda/mixdiff bench train "$r" --vocab 32768 --steps "$steps" --warmup 3 \
    > "$out/bench_$n.json" 2> "$out/bench_$n.err"; echo "bench $n exit $?"
  tail -c 900 "$out/bench_$n.json"; tail -3 "$out/bench_$n.err"
  [ "${REF:-0}" = 1 ] || continue
  for c in "" ${COMPILE:+--compile}; do
    timeout 240 python3 tools/reference/mixdiff_ref.py bench-train --recipe "$r" --vocab 32768 \
      --steps "$steps" --warmup 3 --device cuda --dtype bf16 $c > "$out/ref_$n$c.json" 2> "$out/ref_$n$c.err"
    echo "reference $n $c exit $?"; tail -c 600 "$out/ref_$n$c.json"; tail -2 "$out/ref_$n$c.err"
  done
done
