#!/usr/bin/env bash
# Measure the GPU memory and time per step of h100x4.yaml's experiments on one GPU, without
# their weights: every model is `random:experiments/configs/<name>` (the real architecture,
# random weights), every shape is the plan's. Each run writes results.json with
# peak_gpu_mem_bytes, s_per_step and wall_s; the table at the end is what
# experiments/README.md derives h100x4.yaml's mem and time from.
#
#   bash experiments/footprint.sh [OUT_DIR] [WHICH...]      (from the repository root)
set -euo pipefail
out=${1:-footprint}; shift || true
which=${*:-"bridge probe lora zeroshot latency xsum ablation"}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1
cfg=random:experiments/configs
llama8=$cfg/llama-3.1-8b mistral7=$cfg/mistral-7b-v0.3
bridge() { python experiments/bridge.py --task sst2 --max-len 128 --batch-size 16 --dtype bfloat16 \
             --steps 30 --log-every 10 --ckpt-every 1000 --max-test 512 "$@"; }

for w in $which; do case $w in
  bridge)   bridge --sender $llama8 --receiver $mistral7 --out $out/bridge ;;
  probe)    python experiments/probe.py --model $llama8 --task sst2 --layers 8 16 24 32 --dtype bfloat16 \
              --max-len 128 --batch-size 64 --max-train 4096 --max-test 512 --out $out/probe ;;
  lora)     python experiments/baselines.py --method lora --model $mistral7 --task sst2 --dtype bfloat16 \
              --max-len 128 --batch-size 16 --steps 30 --log-every 10 --ckpt-every 1000 --max-test 512 --out $out/lora ;;
  zeroshot) python experiments/baselines.py --method zeroshot --model $mistral7 --task trec --dtype bfloat16 \
              --batch-size 16 --max-test 512 --out $out/zeroshot ;;
  latency)  for c in 1 16; do for b in 1 128; do
              python experiments/latency.py --sender $llama8 --receiver $mistral7 --dtype bfloat16 --seq-len 256 \
                --compression $c --batch-size $b --warmup 5 --iters 20 --out $out/latency-c$c-b$b; done; done ;;
  # One rank of the plan's 2-GPU run: half of its global batch of 16.
  xsum)     python experiments/xsum.py --model $cfg/flan-t5-large --max-source 512 --max-target 64 --batch-size 8 \
              --lr 1e-4 --steps 30 --log-every 10 --ckpt-every 1000 --max-test 64 --out $out/xsum ;;
  ablation) bridge --sender $cfg/llama-3.2-1b --receiver $mistral7 --out $out/ablation-1b
            bridge --sender $cfg/llama-3.2-3b --receiver $mistral7 --out $out/ablation-3b ;;
  *) echo "footprint.sh: unknown experiment $w" >&2; exit 2 ;;
esac; done

python - "$out" <<'PY'
import json, sys
from pathlib import Path
print(f"{'experiment':<22} {'peak GiB':>9} {'s/step':>8} {'wall s':>8}")
for p in sorted(Path(sys.argv[1]).glob("*/results.json")):
    r = json.loads(p.read_text())
    mem = (r.get("peak_gpu_mem_bytes") or 0) / 2**30
    sps = r.get("s_per_step")
    print(f"{p.parent.name:<22} {mem:9.1f} {sps if sps is None else round(sps, 3)!s:>8} {r['wall_s']:8.1f}")
PY
