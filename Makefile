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
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,serve]"
	@touch $@

demo: $(BIN)/sparse2dense
	$(BIN)/sparse2dense demo

test: $(BIN)/sparse2dense
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/sparse2dense
	$(BIN)/python -m pytest -q -m "not slow"

# The README's results: every method side by side over context lengths at batch 1 (about 11 min on
# a 2-core CPU). Other sweeps: see `sparse2dense bench --help` and the README.
bench: $(BIN)/sparse2dense
	$(BIN)/sparse2dense bench --sweep context --contexts 1000,2000,4000,8000 --batch 1 \
	    --budget 1024 --gamma 6 --repeats 3 --max-new-tokens 48 --out bench-out/context

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
