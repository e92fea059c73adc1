# Two commands for a fresh machine:
#   make run    set up .venv and run the FastFlow bandit on the embedded default model
#   make test   set up .venv with the dev extras and the example plugin, run the tests
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP = $(VENV)/bin/pip -q --disable-pip-version-check
# Torch first, pinned, so no other package pulls a multi-GB CUDA build on a CPU machine.

.PHONY: run test test-installed clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

run: $(VENV)/bin/python
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	$(VENV)/bin/fastflow run --policy ucb

test: $(VENV)/bin/python
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	$(PIP) install ./plugins/fastflow-egreedy  # after fastflow: it depends on it
	$(VENV)/bin/pytest

# The same suite against a regular (non-editable) install in its own environment.
test-installed:
	$(PY) -m venv .venv-installed
	.venv-installed/bin/pip -q --disable-pip-version-check install "$(TORCH)"
	.venv-installed/bin/pip -q --disable-pip-version-check install ".[dev]"
	.venv-installed/bin/pip -q --disable-pip-version-check install ./plugins/fastflow-egreedy
	FASTFLOW_EXPECT_INSTALLED=1 .venv-installed/bin/pytest

clean:
	rm -rf $(VENV) .venv-installed build *.egg-info fastflow-out bench-out
