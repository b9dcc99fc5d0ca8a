"""Imports point one way: slurm -> pretrain -> {model, data_tools} -> common (README, Architecture).

Every import statement of the project's packages is read (module level and inside functions) and
checked against the allowed direction; a new upward import fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "common": set(),
    "data_tools": {"common"},
    "model": {"common"},
    "pretrain": {"common", "data_tools", "model"},
    "slurm": {"common", "pretrain"},
}


def _project_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_imports_point_one_way():
    violations = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no Python files under {package}/"
        for path in files:
            for line, module in _project_imports(path):
                target = module.split(".")[0]
                if target in ALLOWED and target != package and target not in allowed:
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_common_does_not_need_megatron_to_import_media_and_tokens():
    """The data tools' base (media, tokens) imports without Megatron-Core or the model."""
    for path in sorted((ROOT / "common" / "media").glob("*.py")) + sorted((ROOT / "common" / "tokens").glob("*.py")):
        for line, module in _project_imports(path):
            assert not module.startswith("megatron"), f"{path.relative_to(ROOT)}:{line} imports {module}"
