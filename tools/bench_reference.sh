#!/usr/bin/env bash
# MixDiff vs the PyTorch reference (tools/reference/mixdiff_ref.py) on this machine, measured in
# one invocation, alternating the two, REPEATS times each: training tokens/s on random tokens of a
# recipe's shape, and generation tokens/s with a checkpoint's sampler. Prints every run and the
# ratio MixDiff / reference with min / median / max over the repeats. With PyTorch 2.x in .venv
# (tools/setup.sh --torch2) the reference also runs under it, eager and with torch.compile (the
# compiled model is built during the warm-up steps or the first, untimed, generation).
#   tools/bench_reference.sh RECIPE [CHECKPOINT] [REPEATS]
# e.g. tools/bench_reference.sh recipes/quickstart_moe.yaml runs/quickstart_moe 3
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:?usage: tools/bench_reference.sh RECIPE [CHECKPOINT] [REPEATS]}
ckpt=${2:-}
repeats=${3:-3}
py=/usr/bin/python3
py2=""
if .venv/bin/python -c 'import torch, yaml' >/dev/null 2>&1; then py2=.venv/bin/python; fi
out=$(mktemp -d /tmp/mixdiff_vs_ref.XXXXXX)
for i in $(seq "$repeats"); do
  ./build/mixdiff bench train "$recipe" --steps 6 --warmup 2 | tail -n 1 >> "$out/train_mixdiff.jsonl"
  $py tools/reference/mixdiff_ref.py bench-train --recipe "$recipe" --steps 6 --warmup 2 >> "$out/train_ref.jsonl"
  if [ -n "$py2" ]; then
    $py2 tools/reference/mixdiff_ref.py bench-train --recipe "$recipe" --steps 6 --warmup 2 \
      2>/dev/null >> "$out/train_ref2.jsonl"
    $py2 tools/reference/mixdiff_ref.py bench-train --recipe "$recipe" --steps 6 --warmup 2 \
      --compile 2>/dev/null >> "$out/train_ref2c.jsonl"
  fi
  if [ -n "$ckpt" ]; then
    ref_ckpt=$(./build/mixdiff inspect --ckpt "$ckpt" | awk 'NR==1{print $2}')
    ./build/mixdiff bench generate --ckpt "$ckpt" --repeats 2 | tail -n 1 >> "$out/gen_mixdiff.jsonl"
    $py tools/reference/mixdiff_ref.py bench-generate --ckpt "$ref_ckpt" --repeats 2 >> "$out/gen_ref.jsonl"
    if [ -n "$py2" ]; then
      $py2 tools/reference/mixdiff_ref.py bench-generate --ckpt "$ref_ckpt" --repeats 2 \
        2>/dev/null >> "$out/gen_ref2.jsonl"
      $py2 tools/reference/mixdiff_ref.py bench-generate --ckpt "$ref_ckpt" --repeats 2 \
        --compile 2>/dev/null >> "$out/gen_ref2c.jsonl"
    fi
  fi
done
[ -n "$py2" ] && echo "PyTorch 2.x reference: $($py2 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
$py - "$out" <<'PY'
import json, os, statistics, sys
d = sys.argv[1]
def rows(n):
    p = os.path.join(d, n)
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
for what in ("train", "gen"):
    m = rows(f"{what}_mixdiff.jsonl")
    if not m:
        continue
    print(f"{what:5s} mixdiff tokens/s {[round(x['tokens_per_s']) for x in m]}"
          f"  peak RSS MB {max(x['peak_rss_mb'] for x in m):.0f}")
    for ref, label in (("ref", "reference (Debian PyTorch 1.13)"), ("ref2", "reference (PyTorch 2.x eager)"),
                       ("ref2c", "reference (PyTorch 2.x torch.compile)")):
        r = rows(f"{what}_{ref}.jsonl")
        if not r:
            continue
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(m, r)]
        print(f"{what:5s} {label}: tokens/s {[round(x['tokens_per_s']) for x in r]}"
              f"  ratio mixdiff/reference min {min(ratios):.2f} median {statistics.median(ratios):.2f}"
              f" max {max(ratios):.2f}  peak RSS MB {max(x['peak_rss_mb'] for x in r):.0f}")
PY
