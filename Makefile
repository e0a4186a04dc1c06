# embscale: every target sets itself up; nothing needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take this torch build (its CPU wheel is on the machine); CUDA machines take the normal build.
TORCH_CPU_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
SWEEP ?=

.PHONY: install test demo lint bench plots clean help

help:
	@echo "make demo   - run the main job: a small matched sweep end to end (CPU when there is no GPU)"
	@echo "make test   - run the test suite"
	@echo "make lint   - ruff, and the layers of the house (import contracts, no import circles)"
	@echo "make bench  - GPU benchmarks into BENCHMARKS.md"
	@echo "make plots  - regenerate figures (SWEEP=name for one sweep, all sweeps otherwise)"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then \
		echo "$(PYTHON) has a CUDA build of torch: $(VENV) uses its packages instead of downloading another"; \
		$(PYTHON) -c "import site; print(site.getsitepackages()[0])" \
			> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_base_packages.pth"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA machine: installing the default torch build"; \
		$(PY) -m pip install -q "torch>=2.11"; \
	else \
		echo "no CUDA: installing the CPU build $(TORCH_CPU_SPEC)"; \
		$(PY) -m pip install -q "$(TORCH_CPU_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# One worker per core; a test file stays on one worker (its module fixtures, such as the Slurm cluster, start once).
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

demo: install
	$(VENV)/bin/embscale demo

lint: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/test_layers.py

bench: install
	$(VENV)/bin/embscale bench

plots: install
	$(VENV)/bin/embscale plots $(SWEEP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache
