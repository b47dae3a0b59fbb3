# Two entry points for a fresh machine: `make pipeline` (set up + run the DVC pipeline)
# and `make test` (set up + run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# The offline data mirror: $LLM_PIPELINE_MIRROR if set, else ../shared/datasets when present.
LLM_PIPELINE_MIRROR ?= $(if $(wildcard ../shared/datasets),$(abspath ../shared/datasets),)
export LLM_PIPELINE_MIRROR
export PATH := $(BIN):$(PATH)

.PHONY: setup pipeline test test-fast bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# dvc repro with one MLflow parent run per execution (see docs/registry.md).
pipeline: setup
	llm-pipeline run

test: setup
	pytest

# The inner loop while developing (docs/development.md): every test not marked slow, in a few minutes.
test-fast: setup
	pytest -m "not slow"

# One markdown table (docs/benchmarks.md); e.g. make bench BENCH_ARGS="--device cuda" or
# BENCH_ARGS="--dvc-repo /tmp/dvc-scratch --dvc-target evaluate" after benchmarks/dvc_scratch.py.
BENCH_ARGS ?=
bench: setup
	python benchmarks/bench_gpt.py $(BENCH_ARGS)
