# make demo : a fresh .venv, then a FedAvg run on the offline digits data, with plots in runs/demo/
# make test : a fresh .venv, then the whole test suite (notebooks included)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0; on a GPU machine install your CUDA build of torch into .venv first (README).
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/fedkit run --dataset digits --clients 8 --partition dirichlet --alpha 0.5 --rounds 20 --out runs/demo --overwrite
	@echo "open runs/demo/plot.html in a browser, or: $(BIN)/jupyter lab notebooks/"

test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
