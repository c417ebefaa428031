# downscale: the two commands a newcomer needs are `make demo` and `make test`.
# Both run `setup` first, which is idempotent and quick once done.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo.yaml
# The CPU build of torch used on machines without CUDA. Set TORCH_INDEX to a CPU wheel index
# (e.g. https://download.pytorch.org/whl/cpu) where the default index would give CUDA wheels.
TORCH_CPU  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup_venv.sh
	@bash scripts/setup_venv.sh "$(PYTHON)" "$(VENV)" "$(TORCH_CPU)" "$(TORCH_INDEX)"
	@touch $@

demo: setup
	$(BIN)/downscale run $(CONFIG)

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
