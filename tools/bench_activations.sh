#!/usr/bin/env bash
# Activation checkpointing and the memory plan, on one process, side by side in one invocation:
# for the dense and MoE quickstarts and recipes/experiments/moe64.yaml, each
# train.activation_checkpointing mode (none, blocks, every_k with k = 2, and moe for MoE models):
#   - `mixdiff train` for 4 steps: the plan it prints before the first step (memory_plan.json)
#     against the peak RSS of the same process (metrics.jsonl, measured before the final
#     evaluation);
#   - `mixdiff bench train` (4 steps after 1 warm-up, a process without the plan's probe): tokens/s
#     and its peak RSS; the modes alternate, twice, and the median ratio to `none` is reported;
#   - `mixdiff inspect --memory`: the activations each block keeps, with and without.
#   tools/bench_activations.sh [OUT_DIR]     # default runs/bench_activations; needs datasets/default
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench_activations}
mkdir -p "$out"
recipes="quickstart quickstart_moe experiments/moe64"
modes() { case $1 in quickstart) echo "none blocks every_k" ;; *) echo "none blocks every_k moe" ;; esac; }
for r in $recipes; do
  n=$(basename "$r")
  for m in $(modes "$r"); do
    rm -rf "$out/train_${n}_$m"
    ./build/mixdiff train "recipes/$r.yaml" --out "$out/train_${n}_$m" --set train.steps=4 \
      --set train.log_every=2 --set train.ckpt_every=0 --set eval.every=0 --set eval.sequences=32 \
      --set train.activation_checkpointing=$m > "$out/train_${n}_$m.log"
    ./build/mixdiff inspect --recipe "recipes/$r.yaml" --memory \
      --set train.activation_checkpointing=$m > "$out/inspect_${n}_$m.txt"
  done
  for rep in 1 2; do
    for m in $(modes "$r"); do
      ./build/mixdiff bench train "recipes/$r.yaml" --steps 4 --warmup 1 \
        --set train.activation_checkpointing=$m | tail -n 1 > "$out/bench_${n}_${m}_$rep.json"
    done
  done
done
python3 - "$out" $recipes <<'EOF'
import json, statistics, sys
out, recipes = sys.argv[1], [r.split("/")[-1] for r in sys.argv[2:]]
MiB = 1 << 20
print("| recipe | activation checkpointing | plan per rank (MiB) | peak RSS of that run (MiB) | plan error | activations kept, all blocks (MiB) | step peak (MiB) | peak RSS, bench (MiB) | tokens/s (ratio to none) |")
print("|---|---|---|---|---|---|---|---|---|")
for n in recipes:
    modes = ["none", "blocks", "every_k"] + ([] if n == "quickstart" else ["moe"])
    speed = {m: [json.load(open(f"{out}/bench_{n}_{m}_{rep}.json"))["tokens_per_s"] for rep in (1, 2)] for m in modes}
    for m in modes:
        plan = json.load(open(f"{out}/train_{n}_{m}/memory_plan.json"))
        peak = [json.loads(l)["peak_rss_mb"][0] for l in open(f"{out}/train_{n}_{m}/metrics.jsonl") if "peak_rss_mb" in l][-1]
        bench = [json.load(open(f"{out}/bench_{n}_{m}_{rep}.json"))["peak_rss_mb"] for rep in (1, 2)]
        total = plan["total_bytes"] / MiB
        kept = sum(plan["block_activation_bytes_checkpointed"]) / MiB
        ratio = statistics.median(a / b for a, b in zip(speed[m], speed["none"]))
        print(f"| {n} | {m} | {total:.0f} | {peak:.0f} | {100 * (total - peak) / peak:+.1f}% | {kept:.1f} | "
              f"{plan['step_peak_bytes'] / MiB:.0f} | {max(bench):.0f} | {statistics.median(speed[m]):,.0f} ({ratio:.2f}x) |")
EOF
