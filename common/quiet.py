"""Silence Megatron-Core's import-time warnings about optional GPU packages we do not need.

Without transformer-engine and NVIDIA apex, Megatron-Core warns at import that it falls back to its
local (pure PyTorch) implementations. That fallback is this project's intended CPU path, so the
warnings only bury the messages that matter. ``common/__init__.py`` installs the filters, so every
process of the project has them before it imports Megatron-Core (see there why that holds).
"""

from __future__ import annotations

import warnings

_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated\. Use empty cuda_graph_scope",  # Megatron's own default value
    # Expert layers with expert-tensor-parallel 1 run without sequence parallelism, as intended.
    r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1",
    # Megatron's distributed optimizer probes `.grad` of its parameter shards, which are views.
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)


# torch deprecations triggered inside Megatron-Core 0.16's collectives; nothing a user can act on.
_TORCH_DEPRECATIONS = (
    r"Please use DTensor instead and we are deprecating ShardedTensor",  # inside dist_checkpointing
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    # torch.distributed.checkpoint's, called by dist_checkpointing's loader (every resume, every rank)
    r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead",
)


def silence_optional_dependency_warnings() -> None:
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for message in _TORCH_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
