# make demo : a fresh .venv, then a FedAvg run on the offline digits data, with plots in runs/demo/
# make test : a fresh .venv, then the whole test suite (notebooks included)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 from PyPI (on Linux: the CUDA build, several GB); for the CPU build or your own CUDA build,
# install it into .venv first, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" (README).
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@echo ">>> installing $(TORCH) into $(VENV) unless it has a torch (a large download: pip shows its progress)"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --progress-bar on $(TORCH)
	@echo ">>> installing fedkit and its dependencies (-e .[dev]) into $(VENV)"
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	@echo ">>> $(VENV) is ready"
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
