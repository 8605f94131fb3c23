# fleetd developer and CI entry points. `make test` is the README's test command: on a
# fresh machine it installs and starts the Docker engine, builds the test images, lints,
# and runs every test; on a machine that has all that it only lints and tests.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLE_GPU := 12GiB:"RTX 4070 SUPER"

.PHONY: venv example demo demo-standin lint test bench clean

venv: $(STAMP)

# Reinstall only when the dependencies may have changed. ensure-python.sh first: a bare
# Debian has no python3, and Debian's python3 makes no venv without python3-venv (it
# installs what is missing, as root). A .venv without pip (a failed earlier attempt) is
# made afresh.
$(STAMP): pyproject.toml
	@PYTHON='$(PYTHON)' bash scripts/ensure-python.sh
	test -x $(BIN)/pip || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

example: venv
	$(BIN)/fleetctl plan --config examples/fleet.yaml --gpu $(EXAMPLE_GPU)
	$(BIN)/fleetctl generate --config examples/fleet.yaml --gpu $(EXAMPLE_GPU) \
		--out compose/example --state-dir state

# The supervision loop end to end against a real llama.cpp server on the CPU, no GPU
# needed (15-25 s once its image is built; the script builds it when missing).
demo: venv
	bash scripts/ensure-docker.sh demo
	bash scripts/demo-llamacpp.sh

# The faster variant: the same loop on stand-in containers (seconds).
demo-standin: venv
	bash scripts/ensure-docker.sh demo
	bash scripts/build-test-images.sh oom-emitter
	bash scripts/demo.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv
	bash scripts/ensure-docker.sh
	bash scripts/ensure-compose.sh
	bash scripts/ensure-prometheus.sh
	bash scripts/ensure-sshd.sh
	bash scripts/build-test-images.sh
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/run.py

# Leaves state/ alone: it may hold a ladder position someone relies on.
clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache \
		.hypothesis .benchmarks compose/example
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
