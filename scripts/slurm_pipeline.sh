#!/usr/bin/env bash
# Submit a whole experiment to SLURM as three dependent jobs: data+base+compress on one GPU, then a job
# array with one student per task (one GPU each), then combine+evaluate:
#   scripts/slurm_pipeline.sh CONFIG [key.path=value ...]
# Edit the #SBATCH lines of scripts/slurm_*.sbatch (partition, account, time) for your cluster. The run
# directory must be on a file system every node sees; the manifest is updated under a file lock.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [key.path=value ...]" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
N=$(downscale config "$@" --json | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["compress"]["num_students"] or (c["data"]["cluster"]["k"] if c["data"]["shard_by"]=="cluster" else len(c["data"]["sources"])))')
prep=$(sbatch --parsable "$HERE/slurm_stage.sbatch" run "$@" --to compress)
students=$(sbatch --parsable --dependency=afterok:$prep --array=0-$(( N - 1 )) "$HERE/slurm_specialize.sbatch" "$@")
final=$(sbatch --parsable --dependency=afterok:$students "$HERE/slurm_stage.sbatch" run "$@" --from combine)
echo "submitted: prepare $prep -> students $students (array 0-$(( N - 1 ))) -> combine+evaluate $final"
