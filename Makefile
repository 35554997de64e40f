# The two front-door commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test test-fast install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned to the CPU wheel when no torch is importable: an unpinned
# torch pulls several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# the demo study is a spec (examples/demo.yaml, docs/runner.md): a rerun skips what is done
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory install && \
	$(BIN)/diffprobe run examples/demo.yaml --out runs/demo && \
	echo "make demo: wall time $$(( $$(date +%s) - start )) s (install included)"

# The suite runs on one pytest-xdist worker per core (at most 8: each loads its own dummy
# models); `make test TEST_WORKERS=0` runs it in this process. worksteal: each worker starts on
# its half of the tests in file order (module fixtures are built once per worker) and takes
# over the rest of the other's when it runs dry.
TEST_WORKERS ?= auto
XDIST := -n $(TEST_WORKERS) --maxprocesses 8 --dist worksteal

test: install
	$(BIN)/python -m pytest tests $(XDIST)

# the fast loop: everything but the tests marked slow (subprocesses, training, doc pages, and
# any test over about 0.5 s on an idle core)
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow" $(XDIST)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
