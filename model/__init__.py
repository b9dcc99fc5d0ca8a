"""Qwen3-VL (dense and MoE) on Megatron-Core: see model/README.md for the modules and commands
(``python -m model.sizes``, ``model.convert``, ``model.check_parity``)."""

from common.quiet import silence_optional_dependency_warnings

silence_optional_dependency_warnings()
