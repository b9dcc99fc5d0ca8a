"""Import LLaVA-Instruct conversations (JSON array or JSONL) as an SFT shard set, the one build-sft writes.

Records: ``{"id", "image": path | "images": [path] | "video": path, "conversations": [{"from": "human"|"gpt"|"system",
"value": "<image>\\n..."}]}``; ``<image>``/``<video>`` placeholders are matched in order to the listed media,
which are relative to --media-root. See data_tools.importers.llava for the translation, data_tools.kinds.sft
for the validation rules and data_tools.build for the output folder.
"""

from __future__ import annotations

import argparse

from data_tools.config import add_build_arguments

KIND = "sft"
IMPORTER = "llava"
COMMAND = "import-llava"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_arguments(
        parser, KIND, input_flag="--json", input_help="LLaVA-Instruct file: one JSON array of records, or JSONL", media_root=True
    )


def run(args: argparse.Namespace) -> int:
    from data_tools.build import run_build_command
    from data_tools.config import config_from_args

    return run_build_command(config_from_args(args, KIND, IMPORTER), COMMAND)
