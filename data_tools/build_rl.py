"""Build WebDataset shards of RL post-training prompts (with reference answers) from a JSONL manifest.

Manifest lines: ``{"messages": [{"role": "system"|"user", "content": str | [{"type": "text", "text": str} | {"type": "image", "image": path} | {"type": "video", "video": path}]}], "answer": str | null, "reward"?: str, "id"?: str}``: the SFT message format ending with a user turn, no assistant turn; ``reward`` defaults to exact_match. Relative media paths are relative to the manifest's folder.
See data_tools.build for the output folder and data_tools.kinds.rl for the validation rules; the
trainer reads the set with pretrain.posttrain.prompt_set.load_prompt_set.
"""

from __future__ import annotations

import argparse

from data_tools.config import add_build_arguments

KIND = "rl"
COMMAND = "build-rl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_arguments(parser, KIND)


def run(args: argparse.Namespace) -> int:
    from data_tools.build import run_build_command
    from data_tools.config import config_from_args

    return run_build_command(config_from_args(args, KIND), COMMAND)
