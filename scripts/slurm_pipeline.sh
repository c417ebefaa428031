#!/usr/bin/env bash
# Submit a whole experiment to SLURM as three dependent jobs: data+base+compress on one GPU, then a job
# array with one student per task (one GPU each), then combine+evaluate:
#   scripts/slurm_pipeline.sh [--wait] CONFIG [key.path=value ...]
# The run directory must be on a file system every node sees; the manifest is updated under a file lock.
# Logs: <run>/logs/slurm/. Each job starts only if the one before succeeded (afterok); a failed job cancels the
# ones after it (--kill-on-invalid-dep). Submitting again is the way to resume: complete stages and students are
# skipped, an interrupted student continues from its last checkpoint.
# --wait: stay until the last job ends; say which job or student task failed and how to resubmit; exit 0 only
# when combine+evaluate completed.
# Environment: SBATCH_ARGS, options for every sbatch call (they override the scripts' #SBATCH lines, written for a
# GPU cluster: e.g. SBATCH_ARGS="--partition=cpu --gres=none --mem=8G --cpus-per-task=2"); DOWNSCALE, the command
# (default: downscale); POLL, seconds between checks with --wait (default 10).
set -euo pipefail
WAIT=0
if [[ ${1:-} == --wait ]]; then WAIT=1; shift; fi
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--wait] CONFIG [key.path=value ...]" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
DOWNSCALE=${DOWNSCALE:-downscale}
export DOWNSCALE
read -r N RUN_DIR < <($DOWNSCALE config "$@" --json | python3 -c '
import json, sys
c = json.load(sys.stdin)
n = c["compress"]["num_students"] or (c["data"]["cluster"]["k"] if c["data"]["shard_by"] == "cluster"
                                      else len(c["data"]["sources"]))
print(n, c["run"]["dir"] or "runs/" + c["run"]["name"])')
LOGS="$RUN_DIR/logs/slurm"
mkdir -p "$LOGS"
read -r -a EXTRA <<< "${SBATCH_ARGS:-}"
submit() { sbatch --parsable --kill-on-invalid-dep=yes "${EXTRA[@]}" "$@"; }
prep=$(submit --output="$LOGS/prepare-%j.out" "$HERE/slurm_stage.sbatch" run "$@" --to compress)
prep=${prep%%;*}
students=$(submit --dependency=afterok:"$prep" --array=0-$(( N - 1 )) --output="$LOGS/student-%A_%a.out" \
  "$HERE/slurm_specialize.sbatch" "$@")
students=${students%%;*}
final=$(submit --dependency=afterok:"$students" --output="$LOGS/final-%j.out" "$HERE/slurm_stage.sbatch" run "$@" \
  --from combine)
final=${final%%;*}
echo "submitted: prepare $prep -> students $students (array 0-$(( N - 1 ))) -> combine+evaluate $final; logs in $LOGS"
[[ $WAIT -eq 1 ]] || exit 0

# --wait: the states of the three jobs (and every array task) from scontrol, until the last one ends
state() {  # JOBID -> one "id state" line per job or array task; nothing once SLURM has forgotten the job
  scontrol show job -o "$1" 2>/dev/null | sed -n 's/.*JobId=\([0-9]*\) .*ArrayTaskId=\([0-9]*\) .*JobState=\([A-Z_]*\) .*/\2 \3/p; s/^JobId=\([0-9]*\) .*JobState=\([A-Z_]*\) .*/\1 \2/p'
}
final_state() { scontrol show job -o "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\) .*/\1/p' | head -1; }
resubmit="resubmit with: $0 $* (complete stages and students are skipped; an interrupted student resumes from its checkpoint)"
while :; do
  s=$(final_state "$final")
  case "$s" in
    COMPLETED) echo "combine+evaluate $final completed: $RUN_DIR/eval/report.md"; exit 0 ;;
    ""|PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|RESIZING|SUSPENDED) ;;
    *)  # the final job ended without completing: say which job before it failed
      p=$(final_state "$prep")
      if [[ $p != COMPLETED ]]; then
        echo "prepare job $prep (data, base, compress) ended $p: see $LOGS/prepare-$prep.out; $resubmit" >&2
      else
        failed=0
        while read -r task st; do
          if [[ $st != COMPLETED ]]; then
            failed=1
            echo "student task $task (job ${students}_$task) ended $st: see $LOGS/student-${students}_$task.out" >&2
            echo "resubmit that student and then combine+evaluate with: j=\$(sbatch --parsable --array=$task" \
              "--output=$LOGS/student-%A_%a.out ${SBATCH_ARGS:-} $HERE/slurm_specialize.sbatch $*) &&" \
              "sbatch --dependency=afterok:\${j%%;*} --kill-on-invalid-dep=yes --output=$LOGS/final-%j.out" \
              "${SBATCH_ARGS:-} $HERE/slurm_stage.sbatch run $* --from combine" >&2
          fi
        done < <(state "$students")
        [[ $failed -eq 1 ]] || echo "combine+evaluate job $final ended $s: see $LOGS/final-$final.out" >&2
        echo "or $resubmit" >&2
      fi
      exit 1 ;;
  esac
  sleep "${POLL:-10}"
done
