#!/usr/bin/env bash
# Fuzzes MixDiff's parsers of user files with libFuzzer under AddressSanitizer and
# UndefinedBehaviorSanitizer: recipe YAML, --set overrides, safetensors, token shards, tokenizer
# folders, trainer_state.json (fuzz/targets.h). Builds the LibTorch-free parsers with clang in
# build-fuzz/ (-DMIXDIFF_FUZZ=ON, about a minute), then runs each target for SECONDS (default 60)
# on tests/fuzz/corpus/<target> plus the inputs it found before (build-fuzz/corpus/<target>).
# A crash is written to build-fuzz/crashes/<target>-crash-*: fix it, then copy the file into
# tests/fuzz/corpus/<target>/ so that the test suite replays it (UnitFuzzRegression).
#   tools/fuzz.sh [SECONDS] [TARGET ...]      e.g. tools/fuzz.sh 600   or   tools/fuzz.sh 30 recipe
# FUZZ_RUNS=N instead runs N inputs per target from seed 1 (deterministic; the test script's
# sanitizer pass over the parsers uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(recipe override safetensors shard_header tokenizer trainer_state)
if ! command -v clang++ > /dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a > /dev/null 2>&1; then
  echo "tools/fuzz.sh: needs clang with libFuzzer (Debian: clang libclang-rt-14-dev; tools/setup.sh --tests)" >&2
  exit 2
fi
CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DMIXDIFF_FUZZ=ON -DMIXDIFF_CCACHE=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo > build-fuzz.configure.log 2>&1 || { cat build-fuzz.configure.log; exit 1; }
rm -f build-fuzz.configure.log
cmake --build build-fuzz -j2 > /dev/null
mkdir -p build-fuzz/crashes
status=0
for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t"
  log="build-fuzz/$t.log"
  if [ -n "${FUZZ_RUNS:-}" ]; then budget=(-runs="$FUZZ_RUNS" -seed=1); else budget=(-max_total_time="$secs"); fi
  if ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 "./build-fuzz/fuzz_$t" \
      "${budget[@]}" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="build-fuzz/crashes/$t-" "build-fuzz/corpus/$t" "tests/fuzz/corpus/$t" > "$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "fuzz $t: ${FUZZ_RUNS:-$secs s}, $runs executions, no crash (corpus $(ls "build-fuzz/corpus/$t" | wc -l) inputs)"
  else
    status=1
    echo "fuzz $t: CRASH, see $log and build-fuzz/crashes/$t-*"
    grep -m3 -E "ERROR|runtime error|unexpected exception" "$log" || tail -5 "$log"
  fi
done
exit $status
