# Set-up on a fresh machine is `make demo` or `make test`: both create .venv and install what they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch==2.13.0 resolves to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo clean

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

demo: $(STAMP)
	$(PY) -m pretrain.demo

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
