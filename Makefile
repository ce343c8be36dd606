# Set-up and the two everyday commands. `make train` and `make test` create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: train test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

## make train [ARGS="--epochs 5 ..."]: the main job on the embedded digits data (see README)
train: $(STAMP)
	$(VENV)/bin/repvgg train $(ARGS)

## make test: lint and type checks, then the whole test suite on CPU
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m mypy src/repvgg
	$(VENV)/bin/python -m pytest -q $(ARGS)
