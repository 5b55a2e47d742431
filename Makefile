# Every target sets up what it needs; `make test` and `make demo` work from a clean clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; override (e.g. TORCH_SPEC=torch) for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# -rs prints why a test was skipped (the browser test without Chromium says how to install it).
test: install
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -rs -m "not slow"

demo: install
	$(BIN)/python -m boft_diffusion.demo

bench: install
	$(BIN)/python benchmarks/bench_train_step.py

lint: install
	$(BIN)/ruff check boft_diffusion tests benchmarks scripts *.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
