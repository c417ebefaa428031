#!/usr/bin/env bash
# The GPU checks still owed (BENCHMARKS.md, "GPU figures owed"), as ONE prepared run for a lent device machine
# (one H100 / H200, PyTorch preinstalled, no network; about 10 minutes of device time at most).
#
# Here, on a machine with pip and the package registries, once per session (the wheels the device image lacks
# or has in other versions; ~19 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.23.0 tokenizers==0.23.3 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5
# There (device `run`, carry [".whl"], timeout_s 600):
#   bash scripts/gpu_checks.sh
# It writes $OUT/gpu_checks.log (every step's output and exit status), $OUT/gpu.json (specialize-step MFU with
# the 8B teacher online, ensemble vs base generation) and $OUT/compress.json (compress of a random LLaMA-3-8B,
# one student, 256 calibration blocks of 2,048 tokens). Each step has its own time limit, so one that hangs
# leaves the others their time.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log=$OUT/gpu_checks.log
step() {
  local limit=$1
  shift
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}
step 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 20 "$PY" -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.get_device_name(0))"
# every stage on the GPU in bf16 (tiny models), the ensemble fast path and the fused KD loss on CUDA
step 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_device.py
# issue 6 (ii) and (iii): specialize MFU with the 8B teacher online (goal >= 35%), ensemble vs base generation
step 240 "$PY" benchmarks/bench_gpu.py --json "$OUT/gpu.json"
# issue 6 (i): compress of a random LLaMA-3-8B (32 layers, bf16) into one planned < 1B student: time, peak memory
step 170 "$PY" benchmarks/bench_compress_width.py --device cuda --layers 32 --dtype bfloat16 --calib 256 \
  --calib-len 2048 --skip-tp --json "$OUT/compress.json"
