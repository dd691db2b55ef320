# Entry points. Every target creates the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin

.PHONY: venv demo test test-fast test-cluster lint dvc docs bench device-wheels
venv: $(VENV)/.installed

# The venv is rebuilt when pyproject.toml changes; torch 2.14.1 is pinned there.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The whole pipeline on the embedded toy default (config/config.yaml): report in reports/toy/index.html.
demo: venv
	PATH="$(BIN):$$PATH" snakemake

# The test suite (what CI runs), and its quick part (no end-to-end runs) for your own loop.
test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# The multi-node test alone: a real SLURM with a two-node partition (root: packages, network namespaces), the
# toy's tune job over both nodes, requeued once; the cluster is stopped afterwards whatever the outcome.
test-cluster: venv
	.ci/slurm.sh start
	ECT_REQUIRE_SLURM=1 $(PY) -m pytest -q tests/test_slurm.py -k two_nodes; status=$$?; .ci/slurm.sh stop; exit $$status

# ruff (pyflakes, import order, bugbear, pyupgrade), snakefmt, and Snakemake's linter on every preset.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check workflow
	for preset in config/*.yaml; do PATH="$(BIN):$$PATH" snakemake --lint --configfile $$preset || exit 1; done

# The DVC pipelines (dvc.yaml, pipelines/<preset>/dvc.yaml), generated from the Snakemake workflow.
dvc: venv
	PATH="$(BIN):$$PATH" $(PY) workflow/generate_dvc.py

# docs/cli.md from `ect --help`, docs/config.md from the run spec (tests/test_docs.py keeps them true).
docs: venv
	$(PY) -c "from ect.cli import help_markdown; open('docs/cli.md', 'w').write(help_markdown())"
	$(PY) -c "from ect.spec import config_reference; open('docs/config.md', 'w').write(config_reference())"

bench: venv
	$(PY) benchmarks/step_time.py

# For a lent GPU machine (no network there, PyTorch installed): the one package of ours it lacks, as a
# wheel for benchmarks/device_check.sh to install there (carry .whl along).
device-wheels: venv
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl clean-fid==0.1.35
