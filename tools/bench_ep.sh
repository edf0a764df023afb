#!/usr/bin/env bash
# Expert parallelism on loopback (Gloo), side by side in one invocation:
#   1. plain EP vs least-loaded EP (LLEP) on 4 processes (EP 4, 8 of the quickstart MoE's 32
#      experts per rank), fine-tuning the balancing sweep's unbalanced run (`none`: no balancing
#      loss or bias) without any balancing, as LLEP's setting is: the largest rows a rank's experts
#      compute per step, the all-to-all's share of the step, tokens/s; alternated, REPEATS each;
#   2. recipes/experiments/moe64.yaml (64 experts per MoE layer) with EP 1 (plain data
#      parallelism) and EP 2 on 2 processes (`mixdiff bench train`, batch 16 and 2 per rank):
#      each rank's weights + gradients + AdamW moments, its peak RSS, and the all-to-all's share.
# Needs the unbalanced run: tools/bench_ep.sh trains it first when runs/balancing_none is absent
# (the sweep's `none` cell: recipes/sweeps/balancing.yaml, 300 steps).
#   tools/bench_ep.sh [OUT_DIR] [REPEATS]     # default runs/bench_ep, 2
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench_ep}
repeats=${2:-2}
bin=./build/mixdiff
mkdir -p "$out"
if [ ! -f runs/balancing_none/checkpoints/latest ]; then
  "$bin" train recipes/quickstart_moe.yaml --out runs/balancing_none \
    --set train.batch_size=4 --set train.grad_accum=4 --set train.steps=300 \
    --set train.ckpt_every=0 --set eval.every=150 --set lr_schedule.warmup_steps=50 \
    --set diffusion.schedule.t_min=0.0 --set "losses=[{kind: masked_diffusion_elbo}]"
fi
port=29650
finetune() {  # $1: run name, $2: ep_balance
  port=$((port + 1))
  rm -rf "$out/$1"
  "$bin" launch --nproc-per-node 4 --master-port "$port" -- train recipes/quickstart_moe.yaml \
    --out "$out/$1" --set init.checkpoint=runs/balancing_none --set dist.expert_parallel=4 \
    --set dist.ep_balance="$2" --set train.steps=30 --set train.log_every=10 \
    --set train.batch_size=4 --set train.grad_accum=1 --set lr_schedule.warmup_steps=0 \
    --set "losses=[{kind: masked_diffusion_elbo}]" --set eval.sequences=16 >/dev/null
}
for i in $(seq 1 "$repeats"); do
  finetune "plain_$i" none
  finetune "llep_$i" least_loaded
done
for batch in 16 2; do
  for ep in 1 2; do
    port=$((port + 1))
    "$bin" launch --nproc-per-node 2 --master-port "$port" -- bench train \
      recipes/experiments/moe64.yaml --steps 4 --warmup 1 --set dist.expert_parallel=$ep \
      --set train.batch_size=$batch | tail -n 1 > "$out/moe64_b${batch}_ep$ep.json"
  done
done
python3 - "$out" "$repeats" <<'EOF'
import json, sys
out, repeats = sys.argv[1], int(sys.argv[2])
print(f"machine: {open('/proc/cpuinfo').read().count('processor')} cores; 4 processes share them")
print("| dispatch | run | largest rows per rank per step | mean rows | a2a share | tokens/s | val NELBO |")
print("|---|---|---|---|---|---|---|")
for i in range(1, repeats + 1):
    for kind in ("plain", "llep"):
        ms = [json.loads(l) for l in open(f"{out}/{kind}_{i}/metrics.jsonl")]
        eps = [m for m in ms if "ep" in m and m["step"] > 10]  # after the first interval
        rmax = sum(m["ep"]["rows_per_step_max"] for m in eps) / len(eps)
        rmean = sum(m["ep"]["rows_per_step_mean"] for m in eps) / len(eps)
        share = sum(m["ep"]["a2a_share"] for m in eps) / len(eps)
        tps = sum(m["tokens_per_s"] for m in eps) / len(eps)
        val = [m["val_nelbo"] for m in ms if "val_nelbo" in m][-1]
        print(f"| {kind} | {i} | {rmax:.0f} | {rmean:.0f} | {share:.3f} | {tps:.0f} | {val:.4f} |")
print()
print("| moe64, 2 processes | batch per rank | weights + grads + AdamW per rank (MiB) | peak RSS per rank (MiB) | tokens/s | a2a share |")
print("|---|---|---|---|---|---|")
for batch in (16, 2):
    for ep in (1, 2):
        j = json.loads(open(f"{out}/moe64_b{batch}_ep{ep}.json").read())
        rss = ", ".join(f"{v:.0f}" for v in j["peak_rss_mb_per_rank"])
        share = j.get("ep", {}).get("a2a_share", 0.0)
        print(f"| EP {ep} | {batch} | {j['model_state_mib']:.0f} | {rss} | {j['tokens_per_s']:.0f} | {share:.3f} |")
EOF
