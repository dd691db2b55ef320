# Entry points. `make test` creates the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test bench
venv: $(VENV)/.installed

# The venv is rebuilt when pyproject.toml changes; torch 2.14.1 is pinned there.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/step_time.py
