# The two commands of the README. Both create the environment (.venv) first if needed;
# re-running is fast once it exists (tools/setup_env.sh keeps a stamp of the pins).
PY := .venv/bin/python

.PHONY: env demo test lint

env:
	@bash tools/setup_env.sh

# Main job: synthetic NYUD-format data (generated if absent) -> train -> evaluate -> plots.
demo: env
	$(PY) tools/demo.py $(DEMO_ARGS)

# Lint, format check, then the whole test suite (GPU tests skip without CUDA), two
# pytest-xdist workers taking one test file each at a time (module fixtures stay shared).
PYTEST_ARGS ?= -n 2 --dist loadfile
test: env lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: env
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
