# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the offline demo
#   make test   installs everything into .venv and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch, installed first so nothing pulls a CUDA build. Override for a GPU
# machine, e.g. `make TORCH=torch demo`.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast bench clean

$(BIN)/sparse2dense: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	@touch $@

demo: $(BIN)/sparse2dense
	$(BIN)/sparse2dense demo

test: $(BIN)/sparse2dense
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/sparse2dense
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/sparse2dense
	$(BIN)/python -m sparse2dense.bench.steps

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
