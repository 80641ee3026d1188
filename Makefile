# Two commands do all the set-up on a fresh machine:
#   make demo   the whole loop on this machine (a few minutes on a laptop CPU)
#   make test   the test suite (real Redis, Ray, gRPC and training)
# and, for the inner loop, `make test-fast`: everything but the slow tier (no whole processes,
# no Ray cluster), under two minutes.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here, not in pyproject.toml: 2.13.0 is the CPU build on CI machines, while
# `pip install nomoat` on a GPU machine still picks the CUDA build it wants.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast bench proto clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/nomoat demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

proto: install
	$(PY) -m nomoat.codegen

clean:
	rm -rf $(VENV) .pytest_cache
