# Two entry points: `make demo` (main job on the default device) and `make test`.
# Both create .venv with Python 3.12 on first use and install the package into it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

# Python 3.12: explicit PYTHON=..., else pyenv's 3.12.x, else python3.12 on PATH.
PYTHON ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null) $$(command -v python3.12 2>/dev/null); do $$p -c 'import sys; assert sys.version_info[:2]==(3,12)' 2>/dev/null && echo $$p && break; done)

.PHONY: demo test test-all venv clean simulate
venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: Python 3.12 not found (pyenv or PATH); set PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(PY) -m jax_sparse_attn.demo

PYTEST := $(PY) -m pytest -n 2 --dist loadfile -p no:cacheprovider --durations=25

test: $(STAMP)
	$(PYTEST) -m "not extended" tests

# Also the `extended` tests (lab switches' other settings, second configurations): before a
# device call that A/Bs a switch, or a release.
test-all: $(STAMP)
	$(PYTEST) tests

simulate: $(STAMP)
	$(PY) -m jax_sparse_attn.simulate --shape 128 128 --kernel 33 33

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
