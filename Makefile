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

.PHONY: install debian-packages demo test test-fast bench proto clean

# Debian packages some tests need (.ci/debian-packages): installed when missing and we are root
# (CI, a fresh machine); otherwise the tests that need them skip and say why.
debian-packages:
	@missing=$$(grep -v '^#' .ci/debian-packages | xargs -r -n1 sh -c 'dpkg -s "$$0" >/dev/null 2>&1 || echo "$$0"'); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "not root: skipping Debian packages $$missing (tests that need them will skip)"; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/nomoat demo

test: install debian-packages
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install debian-packages
	$(PY) -m pytest -m "not slow" --hypothesis-profile=fast $(PYTEST_ARGS)

proto: install
	$(PY) -m nomoat.codegen

clean:
	rm -rf $(VENV) .pytest_cache
