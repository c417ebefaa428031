#!/usr/bin/env bash
# Run a whole experiment on one multi-GPU node with the students specialized in parallel, one per GPU:
#   scripts/launch_students.sh CONFIG [key.path=value ...]
# GPUS (default: every GPU nvidia-smi lists) sets how many students run at once; student i runs on GPU
# i mod GPUS. Logs go to <run>/logs/specialize-<i>.log. Re-running resumes: complete stages and students are
# skipped, interrupted students continue from their last checkpoint.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [key.path=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
DOWNSCALE=${DOWNSCALE:-downscale}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS=$(( GPUS > 0 ? GPUS : 1 ))
N=$($DOWNSCALE config "$CONFIG" "$@" --json | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["compress"]["num_students"] or (c["data"]["cluster"]["k"] if c["data"]["shard_by"]=="cluster" else len(c["data"]["sources"])))')
RUN_DIR=$($DOWNSCALE config "$CONFIG" "$@" --json | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["run"]["dir"] or "runs/" + c["run"]["name"])')
mkdir -p "$RUN_DIR/logs"

$DOWNSCALE run "$CONFIG" "$@" --to compress                       # data, base, compress: once

pids=()
for (( i = 0; i < N; i++ )); do
  gpu=$(( i % GPUS ))
  if (( i >= GPUS )); then wait "${pids[$(( i - GPUS ))]}"; fi   # keep one student per GPU
  CUDA_VISIBLE_DEVICES=$gpu $DOWNSCALE specialize "$CONFIG" "$@" --student "$i" \
    > "$RUN_DIR/logs/specialize-$i.log" 2>&1 &
  pids+=($!)
  echo "student $i on GPU $gpu (pid $!, log $RUN_DIR/logs/specialize-$i.log)"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if (( status )); then
  echo "a student job failed: see $RUN_DIR/logs/; re-run this script to resume" >&2
  exit 1
fi

$DOWNSCALE run "$CONFIG" "$@" --from combine                      # combine, evaluate
