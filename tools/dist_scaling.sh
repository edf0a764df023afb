#!/usr/bin/env bash
# Data-parallel scaling on this machine: trains RECIPE (default the quickstart MoE) for STEPS
# steps at the same global batch with 1 worker and with 2 workers (`mixdiff launch`, one OpenBLAS
# thread each), then prints tokens/s and the gradient all-reduce time per step of each run,
# read from the runs' metrics.jsonl. Usage: tools/dist_scaling.sh [RECIPE] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:-recipes/quickstart_moe.yaml}
steps=${2:-60}
out=$(mktemp -d /tmp/mixdiff_scaling.XXXXXX)
batch=$(./build/mixdiff inspect --recipe "$recipe" | awk '/^train:/{t=1} t && /batch_size:/{print $2; exit}')
common=(--set "train.steps=$steps" --set train.log_every=10 --set eval.every=0
        --set eval.sequences=32 --set train.ckpt_every=0)
./build/mixdiff train "$recipe" --out "$out/w1" "${common[@]}" > "$out/w1.log"
./build/mixdiff launch --nproc-per-node 2 --master-port "${PORT:-29731}" -- \
  train "$recipe" --out "$out/w2" "${common[@]}" --set "train.batch_size=$((batch / 2))" > "$out/w2.log"
for w in 1 2; do
  # Mean over the logged intervals after the first (warm-up).
  /usr/bin/env python3 - "$out/w$w/metrics.jsonl" "$w" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][1:]
tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
ar = sum(r.get("allreduce_s_per_step", 0.0) for r in rows) / len(rows)
print(f"workers {sys.argv[2]}: {tps:8.0f} tokens/s, gradient all-reduce {ar * 1e3:7.1f} ms/step")
PY
done
echo "runs in $out"
