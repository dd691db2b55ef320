# Entry points. `make test` creates the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test bench record device-wheels
venv: $(VENV)/.installed

# The venv is rebuilt when pyproject.toml changes; torch 2.14.1 is pinned there.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The whole pipeline on the embedded toy default (config/config.yaml): report in reports/toy/index.html.
demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake

# After a successful Snakemake run: record its outputs in DVC (dvc.lock), so that `dvc status` of
# that pipeline is clean. Default: the toy (dvc.yaml). A CIFAR-10 preset:
#   make record STAGE=pipelines/cifar10/dvc.yaml:report@cifar10
STAGE ?= dvc.yaml
record: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc commit --force --with-deps $(STAGE)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/step_time.py

# For a lent GPU machine (no network there, PyTorch installed): the one package of ours it lacks, as a
# wheel for benchmarks/device_check.sh to install there (carry .whl along).
device-wheels: venv
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl clean-fid==0.1.35
