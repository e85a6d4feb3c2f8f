#!/usr/bin/env bash
# One node, all its GPUs: each torchrun worker takes part RANK of WORLD_SIZE and writes into the same OUT.
# After a crash or preemption, run the same command again: finished shards are skipped.
#   bash scripts/torchrun_node.sh /data/images /scratch/out qwen3-vl-2b
set -euo pipefail
SRC=${1:?source folder}; OUT=${2:?output folder}; MODEL=${3:-qwen3-vl-2b}
vitok plan "$SRC" -o "$OUT"            # list the files once; every worker reuses the plan
torchrun --standalone --nproc-per-node "$(nvidia-smi -L | wc -l)" -m vitok extract "$SRC" -o "$OUT" --model "$MODEL"
vitok verify "$OUT"
