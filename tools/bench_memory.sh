#!/usr/bin/env bash
# Memory per rank of the options that trade communication or compute for memory, measured side by
# side in one invocation: recipes/experiments/moe64.yaml on 2 processes (`mixdiff launch`,
# `mixdiff bench train`), with and without sharded optimizer state (dist.shard_optimizer), with
# plain data parallelism and expert parallelism 2, at 16 and 2 sequences per rank. Prints each
# rank's weights + gradients + AdamW moments, its peak RSS, tokens/s, and the sharded/unsharded
# ratios, and the memory plan of the same layout (`mixdiff inspect --memory --world 2`) against
# the larger rank's peak RSS.
#   tools/bench_memory.sh [OUT_DIR]     # default runs/bench_memory
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench_memory}
mkdir -p "$out"
for batch in 16 2; do
  for ep in 1 2; do
    for shard in false true; do
      ./build/mixdiff launch --nproc-per-node 2 --master-port $((29600 + RANDOM % 300)) -- bench \
        train recipes/experiments/moe64.yaml --steps 4 --warmup 1 --set dist.expert_parallel=$ep \
        --set dist.shard_optimizer=$shard --set train.batch_size=$batch | tail -n 1 \
        > "$out/moe64_b${batch}_ep${ep}_$shard.json"
      ./build/mixdiff inspect --recipe recipes/experiments/moe64.yaml --memory --world 2 \
        --set dist.expert_parallel=$ep --set dist.shard_optimizer=$shard \
        --set train.batch_size=$batch > "$out/moe64_b${batch}_ep${ep}_$shard.plan.txt"
    done
  done
done
python3 - "$out" <<'EOF'
import json, re, sys
out = sys.argv[1]
def plan(name):
    for line in open(f"{out}/{name}.plan.txt"):
        m = re.match(r"\s+total\s+([0-9.]+) MiB", line)
        if m:
            return float(m.group(1))
print("| moe64, 2 processes | batch per rank | sharded optimizer | weights + grads + AdamW per rank (MiB) | peak RSS per rank (MiB) | memory plan per rank (MiB; error vs the larger rank) | tokens/s |")
print("|---|---|---|---|---|---|---|")
for batch in (16, 2):
    for ep in (1, 2):
        r = {}
        for shard in ("false", "true"):
            j = r[shard] = json.loads(open(f"{out}/moe64_b{batch}_ep{ep}_{shard}.json").read())
            rss = ", ".join(f"{v:.0f}" for v in j["peak_rss_mb_per_rank"])
            p = plan(f"moe64_b{batch}_ep{ep}_{shard}")
            big = max(j["peak_rss_mb_per_rank"])
            print(f"| EP {ep} | {batch} | {shard} | {j['model_state_mib']:.0f} | {rss} | {p:.0f} ({100 * (p - big) / big:+.1f}%) | {j['tokens_per_s']:.0f} |")
        a, b = r["false"], r["true"]
        print(f"|   | ratio sharded/unsharded | | {b['model_state_mib'] / a['model_state_mib']:.2f} | "
              f"{max(b['peak_rss_mb_per_rank']) / max(a['peak_rss_mb_per_rank']):.2f} (max rank) | | "
              f"{b['tokens_per_s'] / a['tokens_per_s']:.2f} |")
EOF
