"""Build WebDataset shards of SFT conversations from a JSONL manifest.

Manifest lines: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": str} | {"type": "image", "image": path} | {"type": "video", "video": path}]}], "id"?: str}``; relative media paths are relative to the manifest's folder.
See data_tools.build for the output folder and data_tools.kinds.sft for the validation rules.
"""

from __future__ import annotations

import argparse

from data_tools.config import add_build_arguments

KIND = "sft"
COMMAND = "build-sft"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_arguments(parser, KIND)


def run(args: argparse.Namespace) -> int:
    from data_tools.build import run_build_command
    from data_tools.config import config_from_args

    return run_build_command(config_from_args(args, KIND), COMMAND)
