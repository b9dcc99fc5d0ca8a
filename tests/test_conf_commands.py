"""Every ``python -m X`` / ``torchrun ... -m X`` that the configs and READMEs tell a user to run exists.

Commands in ``conf/`` comments and in the READMEs are read as text; each module they name must be
importable and runnable with ``-m`` (a module with a ``__main__`` block, or a package with a
``__main__`` module). A renamed or removed entry point then fails here, naming the file and line.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python -m X`, `python3.11 -m X`, `.venv/bin/python -m X`, `torchrun --nproc-per-node 2 -m X`
_COMMAND = re.compile(r"(?:python[\d.]*|torchrun)\b[^`\n]*?\s-m\s+([A-Za-z_][\w.]*)")


def _documents() -> list[Path]:
    readmes = [p for p in sorted(ROOT.glob("*/README.md")) if not p.parent.name.startswith(".")]
    return [*sorted((ROOT / "conf").rglob("*.yaml")), ROOT / "README.md", *readmes]


def _named_modules() -> list[tuple[str, str]]:
    """(where, module) for every command found, where = ``path:line``."""
    found = []
    for path in _documents():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for module in _COMMAND.findall(line):
                found.append((f"{path.relative_to(ROOT)}:{number}", module.rstrip(".")))
    return found


def _why_not_runnable(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as exc:
        return str(exc)
    if spec is None:
        return "no such module"
    if spec.submodule_search_locations is not None:  # a package: runs its __main__
        return None if importlib.util.find_spec(f"{module}.__main__") else "a package without __main__.py"
    source = Path(spec.origin).read_text() if spec.origin and spec.origin.endswith(".py") else ""
    return None if re.search(r"""^if __name__ == ["']__main__["']:""", source, re.M) else "no __main__ block"


def test_the_scan_finds_the_commands():
    modules = {module for _, module in _named_modules()}
    # The scan itself works: the main entry points are named in these documents.
    assert {"pretrain.train", "slurm.submit", "data_tools"} <= modules, sorted(modules)


def test_every_module_named_in_conf_and_readmes_runs_with_dash_m():
    broken = [f"{where}: python -m {module}: {why}"
              for where, module in _named_modules() if (why := _why_not_runnable(module))]
    assert not broken, "\n".join(broken)
