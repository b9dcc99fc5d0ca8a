#!/usr/bin/env bash
# The GPU check: the GPU-marked tests (tests/test_gpu.py) and the step benchmark at Qwen3-VL-2B widths on
# one CUDA GPU, in under 8 minutes, on an air-gapped node that has Python 3.12 and a CUDA build of torch
# but none of this project's other dependencies (or older ones).
#
#   make gpu-wheels                      # on a machine with network: the wheels into .whl/ (~31 MB)
#   bash benchmarks/gpu_check.sh         # on the GPU node, in the repository root, with .whl/ beside it
#
# Parts, each with its own time limit inside an overall budget (GPU_CHECK_BUDGET_S, default 450 s); a part
# that fails or times out is recorded and the next one runs; a summary ends the output:
#   1. environment  python, torch, CUDA, the GPU, what the node already has
#   2. install      the wheels of .whl/ into a private folder (pip --target, no index, no dependencies),
#                   put in front of the node's site-packages with this repository on PYTHONPATH (the
#                   project itself is not pip-installed: pyproject.toml pins Python 3.11)
#   3. imports      every module the tests and the benchmark use, with the versions in effect
#   4. benchmark    benchmarks/bench_step.py --model qwen3vl_2b --layers 4 --seq-length 8192: step time,
#                   tokens/s, MFU
#   5. tests        python -m pytest -m gpu tests/test_gpu.py (measured differences printed)
#   6. attention    benchmarks/bench_attention.py at 4K-128K tokens: first the attention kernels alone (one
#                   varlen flash call vs one SDPA per document, bf16, up to 32K), then the document backend's
#                   peak memory and time on CUDA against the dense mask where it fits (CP rows need 2
#                   GPUs: skipped on one)
#   7. rollout      benchmarks/bench_rollout.py at Qwen3-VL-2B widths (4 decoder layers): a text, an image and a
#                   video prompt, 8 responses each, with the KV cache against recomputation (time, tokens/s,
#                   peak memory, tokens that agree); last, as it only informs the next decoding work
# Everything goes to $OUT/gpu_check.log (OUT: set by the device runner; default ./gpu_check_out) and to
# the console. Exit status 0 when every part passed, 1 otherwise.
#
# Rehearsal on a machine without a GPU (the GPU run is often one shot): the node's Python and torch in a
# venv, the wheels as the node gets them, the GPU tests' bodies on the CPU, small sizes (the environment
# part fails there: no CUDA; the benchmark and rollout parts may time out at 2B widths on a CPU):
#   python3.12 -m venv /tmp/node && /tmp/node/bin/pip install torch==2.11.0 numpy transformers==5.17.0 pytest
#   PYTHON=/tmp/node/bin/python GPU_TESTS_ON_CPU=1 GPU_BENCH_ARGS="--model tiny_moe --steps 2 --warmup 1" \
#     GPU_ATTENTION_ARGS="--lengths 2048 --images 8" GPU_ROLLOUT_ARGS="--model tiny_moe --repeats 1" \
#     GPU_CHECK_BUDGET_S=900 bash benchmarks/gpu_check.sh
# (2026-12-02, Python 3.12.1, torch 2.11.0+cu130 on the CPU, numpy 2.5.2: every part but the environment
# passed, 13 GPU tests on the CPU, 3 skipped: CUDA kernels.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
export PYTHON=${PYTHON:-python3}
export WHEELS=${GPU_WHEELS_DIR:-$REPO/.whl}
export SITE=${GPU_SITE:-${TMPDIR:-/tmp}/qwen3vl_gpu_site}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
BENCH_ARGS=${GPU_BENCH_ARGS:---model qwen3vl_2b --layers 4 --seq-length 8192 --steps 10 --warmup 3}
ATTENTION_ARGS=${GPU_ATTENTION_ARGS:---lengths 4096 16384 32768 131072 --dense-limit-gb 24 --images 256}
ROLLOUT_ARGS=${GPU_ROLLOUT_ARGS:---model qwen3vl_2b --layers 4 --repeats 2}
# Nothing may try the network (an air-gapped node would wait for a timeout); one thread pool per rank.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
SUMMARY=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# part NAME LIMIT_S COMMAND...: run COMMAND (a program or one of the functions below) with its output in
# the log, at most LIMIT_S seconds (less when the overall budget is nearly spent); record ok /
# FAILED(exit status) / TIMEOUT.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        log "=== $name: not run, the ${BUDGET} s budget is spent"
        SUMMARY+=("$(printf '%-12s %-10s %6s' "$name" "SKIPPED" "-")")
        FAILED=1
        return 0
    fi
    log "=== $name (limit ${limit} s): $*"
    local t0 rc status
    t0=$(date +%s)
    set +e
    timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status=TIMEOUT
        FAILED=1
    else
        status="FAILED($rc)"
        FAILED=1
    fi
    log "=== $name: $status after $(($(date +%s) - t0)) s"
    SUMMARY+=("$(printf '%-12s %-10s %5ss' "$name" "$status" "$(($(date +%s) - t0))")")
}

environment() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    fi
    PYTHONPATH="" "$PYTHON" - <<'EOF'  # the node as it is, before the install
import importlib.metadata as md
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU 0: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s)")
for name in ("numpy", "transformers", "megatron-core", "transformer-engine", "pytest", "pillow"):
    try:
        print(f"node has {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"node has no {name}")
raise SystemExit(0 if torch.cuda.is_available() else 1)
EOF
}

install() {
    local wheels=("$WHEELS"/*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        echo "no wheels in $WHEELS: run 'make gpu-wheels' where there is network and bring .whl/ along"
        return 1
    fi
    echo "${#wheels[@]} wheels, $(du -sh "$WHEELS" | cut -f1), into $SITE"
    rm -rf "$SITE"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$SITE" "${wheels[@]}"
    else  # no pip on the node: a wheel is a zip archive of the files to import
        "$PYTHON" - "$SITE" "${wheels[@]}" <<'EOF'
import pathlib, shutil, sys, zipfile

site = pathlib.Path(sys.argv[1])
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(site)
for data in site.glob("*.data"):
    for lib in ("purelib", "platlib"):
        if (data / lib).is_dir():
            shutil.copytree(data / lib, site, dirs_exist_ok=True)
print("unpacked without pip")
EOF
    fi
}

imports() {
    "$PYTHON" - <<'EOF'
import importlib
import importlib.metadata as md

import numpy
import torch

# What tests/test_gpu.py and benchmarks/bench_step.py import (directly or through the project); common
# first, as every entry point does: it silences Megatron's optional-dependency warnings.
for module in ("common", "megatron.core", "transformers", "tokenizers", "safetensors", "PIL", "yaml", "hydra",
               "omegaconf", "pytest", "pytest_timeout", "model.qwen3vl", "model.hf_adapter", "model.check_parity",
               "pretrain.trainer", "pretrain.checkpoint", "pretrain.cli", "pretrain.data.encoding",
               "tests.model.tiny_hf", "benchmarks.bench_step"):
    importlib.import_module(module)
versions = {name: md.version(name) for name in ("megatron-core", "transformers", "tokenizers", "safetensors",
                                                "pillow", "hydra-core", "pytest")}
print(f"numpy {numpy.__version__} ({numpy.__file__})")
print(", ".join(f"{k} {v}" for k, v in versions.items()))
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration  # noqa: F401
from model.layer_specs import resolve_attention_backend
print(f"default attention backend: {resolve_attention_backend(None)}")
EOF
}

export -f environment install imports

COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')
log "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $COMMIT, budget ${BUDGET} s"
part environment 60 environment
part install 120 install
part imports 90 imports
# The benchmark before the tests: its MFU is the figure the check exists for, and a part that overruns
# cuts the later ones (model.attention checks the varlen kernel against per-document attention at its
# first use, in the benchmark as anywhere).
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
part benchmark 180 "$PYTHON" benchmarks/bench_step.py $BENCH_ARGS
# Only the plugins the wheels bring (pytest-timeout): the node's own (xdist, cov, hypothesis, ...) were
# built for its older pytest, and one that fails to load would fail the whole part.
part tests 270 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PYTHON" -m pytest -p pytest_timeout -m gpu tests/test_gpu.py \
    -s -rA -p no:cacheprovider --timeout 240
# shellcheck disable=SC2086
part attention 120 "$PYTHON" benchmarks/bench_attention.py $ATTENTION_ARGS
# shellcheck disable=SC2086
part rollout 90 "$PYTHON" benchmarks/bench_rollout.py $ROLLOUT_ARGS

# The figures, gathered from the log before the summary is appended to it.
figures=$(grep -E '^(=+ .* in [0-9.]+s|bench_step: |global batch per step: |megatron \(|MFU: |document backend peak|images. share|kernels |attention kernels|bench_rollout: |with the KV cache|recomputed (\(no cache\)|/cached)|tokens equal)' "$LOG" || true)
log ""
log "=== summary: $(($(date +%s) - START)) s in all, log $LOG"
for line in "${SUMMARY[@]}"; do log "$line"; done
log "$figures"
exit "$FAILED"
