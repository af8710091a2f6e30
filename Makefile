# Two commands on a fresh machine: `make reproduce` (results/smoke/ from every notebook) and `make test`.
# Both create .venv and install the pinned environment on first use (~5.5 GB of PyPI wheels, a few minutes): the
# package with its `dev` and `cluster` extras (the test suite runs the Dask executor on a local cluster).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zsadkit-installed
PROFILE ?= smoke

.PHONY: install reproduce book test test-all lint strip notebooks lab clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,cluster]"
	touch $(STAMP)

install: $(STAMP)

## Regenerate results/$(PROFILE)/ by running every registered notebook with papermill (resumes; FORCE=1 reruns).
reproduce: $(STAMP)
	$(BIN)/python -m zsadkit.reproduce --profile $(PROFILE) $(if $(FORCE),--force,)

## Render results/$(PROFILE)/executed/*.ipynb (from `make reproduce`) into a static site: results/$(PROFILE)/book/index.html.
book: $(STAMP)
	$(BIN)/python -m zsadkit.book --profile $(PROFILE)

## The default test suite (slow tests excluded); `make test-all` includes them.
test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check zsadkit tests benchmarks

## Open the notebooks in JupyterLab on the project's venv (outputs of notebooks run by hand go to results/scratch/).
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

## Regenerate notebooks/*.ipynb (without outputs) from their jupytext py:percent sources.
notebooks: $(STAMP)
	$(BIN)/jupytext --update --to ipynb notebooks/[0-9]*.py

strip: $(STAMP)
	$(BIN)/nbstripout notebooks/*.ipynb

clean-results:
	rm -rf results/smoke
