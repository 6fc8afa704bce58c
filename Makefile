# Two entry points that work on a fresh machine:
#   make demo   set up .venv and run the whole pipeline on the embedded synthetic phantom
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin
# On machines without CUDA the pinned CPU build of torch is installed first; a bare `torch`
# requirement would pull a multi-GB CUDA build. Set TORCH_SPEC to override.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: setup demo test test-slow lint brats18 clean

$(BIN)/cldf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/cldf

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES)
	@echo; PATH="$(abspath $(BIN)):$$PATH" $(BIN)/cldf tables results/synthetic

# Unit tests plus one tiny end-to-end run of the workflow (.test/config.yaml); under 10 minutes on 2 cores.
test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

# The full demo, the real-scan tests and the kill tests (tests marked slow).
test-slow: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m slow --run-slow

lint: setup
	$(BIN)/snakemake --lint --snakefile workflow/Snakefile

brats18: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) results/brats18_shared/metrics.csv

clean:
	rm -rf results .snakemake
