# The two commands: `make demo` (the main job) and `make test` (lint, types, tests).
# Both create .venv and install what is missing. Torch: an importable torch >= 2.4
# is kept as it is; otherwise the CPU build torch==2.13.0 is installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/compare

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))" 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# The native kernels (C and C++ against the installed torch, 15-30 s): built now so that no
	@# run pays for it later; without a compiler the package works on its other kernels.
	$(BIN)/python -c "import sys; from batchnorm.kernels import native; sys.exit(native.main())" || true
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/batchnorm compare --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
