#!/usr/bin/env bash
# The GPU checks still owed (BENCHMARKS.md, "GPU figures owed"), as ONE prepared run for a lent device machine
# (one H100 / H200, PyTorch preinstalled, no network; about 10 minutes of device time at most).
#
# Here, on a machine with pip and the package registries, once per session: the wheels the device image lacks
# or has in other versions (it had torch 2.11 and transformers 5.17, no pydantic), with their dependencies,
# for its Python 3.12 (~45 MB; checked: they install and import with a local Python 3.12):
#   echo /.whl/ >> .git/info/exclude
#   P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl"
#   python3 -m pip download -q $P transformers==5.23.0 pydantic==2.14.4 pytest==9.2.0 psutil
#   python3 -m pip download -q --no-deps $P accelerate==1.15.0
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
  # into a side folder, resolved from the carried wheels only (never torch: the image's CUDA build stays)
  "$PY" -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir --upgrade --target /tmp/site \
    transformers==5.23.0 pydantic==2.14.4 pytest==9.2.0 psutil \
    && "$PY" -m pip install -q --no-index --no-deps --find-links .whl --no-compile --no-cache-dir --upgrade \
      --target /tmp/site accelerate==1.15.0 \
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
# what else the stages import (the evaluate stage's plots and law fits need matplotlib and scipy): missing ones are
# named here, so a failing step below is explained by one line
step 60 "$PY" -c "
import importlib
for m in ('numpy', 'safetensors', 'tokenizers', 'yaml', 'tqdm', 'pydantic', 'psutil', 'pytest', 'scipy', 'sklearn',
          'matplotlib', 'peft', 'datasets', 'torch_pruning', 'downscale.cli'):
    try:
        mod = importlib.import_module(m)
        print('ok     ', m, getattr(mod, '__version__', ''))
    except Exception as exc:
        print('MISSING', m, type(exc).__name__, exc)
"
# every stage on the GPU in bf16 (tiny models), the ensemble fast path and the fused KD loss on CUDA
step 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py
# issue 6 (ii) and (iii): specialize MFU with the 8B teacher online (goal >= 35%), ensemble vs base generation
step 240 "$PY" benchmarks/bench_gpu.py --json "$OUT/gpu.json"
# issue 6 (i): compress of a random LLaMA-3-8B (32 layers, bf16) into one planned < 1B student: time, peak memory
step 170 "$PY" benchmarks/bench_compress_width.py --device cuda --layers 32 --dtype bfloat16 --calib 256 \
  --calib-len 2048 --skip-tp --json "$OUT/compress.json"
