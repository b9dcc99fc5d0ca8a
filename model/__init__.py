"""Qwen3-VL (dense and MoE) on Megatron-Core: see model/README.md for the modules and commands
(``python -m model.sizes``, ``model.convert``, ``model.check_parity``)."""

import common  # noqa: F401  (first: installs common.quiet's warning filters before anything imports Megatron)
