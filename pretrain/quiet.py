"""Silence Megatron-Core's import-time warnings about optional GPU packages we do not need.

Without transformer-engine and NVIDIA apex, Megatron-Core warns at import that it falls back to its
local (pure PyTorch) implementations. That fallback is this project's intended CPU path, so the
warnings only bury the messages that matter. Called by the package ``__init__`` files, before
Megatron-Core is imported.
"""

from __future__ import annotations

import warnings

_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated\. Use empty cuda_graph_scope",  # Megatron's own default value
)


def silence_optional_dependency_warnings() -> None:
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
