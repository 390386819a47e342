# The two commands of the README: `make run` (set up, then the whole pipeline on embedded
# defaults) and `make test` (set up, then the test suite). Both set up .venv first.
.PHONY: setup run test test-fast
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/clipgs pipeline

test: setup
	.venv/bin/python -m pytest -q tests

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests
