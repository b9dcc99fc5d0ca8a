"""The project's commands print none of Megatron-Core's optional-dependency warnings (common/quiet.py).

Real commands in fresh interpreters, stderr read as a user sees it: the CLIs, and a rank process started
by ``common.distributed.spawn`` (how the multi-rank tools and tests start ranks) whose function imports
Megatron before anything of ``pretrain`` or ``model``. The torchrun ranks of ``pretrain.train`` are
checked in tests/test_trainer.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.quiet import _MESSAGES, _TORCH_DEPRECATIONS

ROOT = Path(__file__).resolve().parents[1]
_SILENCED = re.compile("|".join(_MESSAGES + _TORCH_DEPRECATIONS))


def import_megatron_optimizer(rank: int) -> int:
    """A rank body that imports Megatron-Core first (its optimizer package warns four times at import)."""
    import megatron.core.optimizer  # noqa: F401

    return rank


def _stderr(args: list[str]) -> str:
    # "-W default": show every warning once, whatever the caller's PYTHONWARNINGS, as a user would see it.
    done = subprocess.run([sys.executable, "-W", "default", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stderr


@pytest.mark.parametrize("args", [
    ["-m", "pretrain.train", "--cfg", "job"],
    ["-m", "data_tools", "--help"],
    ["-m", "model.sizes", "tiny_dense", "--no-reference"],
    ["-c", "from common.distributed.spawn import spawn_ranks; from tests.test_quiet import "
           "import_megatron_optimizer as f; assert spawn_ranks(f, 1) == [0]"],
], ids=["pretrain.train --cfg job", "data_tools --help", "model.sizes", "spawned rank"])
def test_commands_print_no_optional_dependency_warnings(args):
    stderr = _stderr(args)
    assert not _SILENCED.search(stderr), stderr[-3000:]
    assert "UserWarning" not in stderr, stderr[-3000:]
