# make demo : a fresh .venv with fedkit alone (no extras), then a FedAvg run on the offline digits data, with plots in runs/demo/
# make test : a fresh .venv with the dev extras, then the whole test suite (notebooks included)
# make setup: the dev install alone
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 from PyPI (on Linux: the CUDA build, several GB); for the CPU build or your own CUDA build,
# install it into .venv first, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" (README).
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, the one large download; every install below keeps the torch .venv has
$(VENV)/.installed-torch: $(BIN)/python
	@echo ">>> installing $(TORCH) into $(VENV) unless it has a torch (a large download: pip shows its progress)"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --progress-bar on $(TORCH)
	touch $@

# what the demo needs: fedkit and its core dependencies (its plot is plotly's, a core one), no extras
$(VENV)/.installed-demo: $(VENV)/.installed-torch pyproject.toml
	@echo ">>> installing fedkit and its core dependencies (-e .) into $(VENV)"
	$(BIN)/pip install --progress-bar on -e .
	touch $@

# what the tests need: the dev extra (every other extra, pytest, the notebooks' and the packaging test's tools)
$(VENV)/.installed-dev: $(VENV)/.installed-torch pyproject.toml
	@echo ">>> installing fedkit and its development extras (-e .[dev]) into $(VENV)"
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	@echo ">>> $(VENV) is ready"
	touch $@

setup: $(VENV)/.installed-dev

demo: $(VENV)/.installed-demo
	$(BIN)/fedkit run --dataset digits --clients 8 --partition dirichlet --alpha 0.5 --rounds 20 --out runs/demo --overwrite
	@echo "open runs/demo/plot.html in a browser; for the notebooks: $(BIN)/pip install -e '.[notebooks]' && $(BIN)/jupyter lab notebooks/"

test: $(VENV)/.installed-dev
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
