"""Import chat "messages" records (Qwen fine-tuning examples, ms-swift) as an SFT shard set, the one build-sft writes.

Records: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text"|"image"|"video", ...}]}],
"images"?: [path], "videos"?: [path]}``; ms-swift's ``<image>``/``<video>`` placeholders are matched in order to
the top-level lists; relative media paths are relative to --media-root. See data_tools.importers.messages for
the translation, data_tools.kinds.sft for the validation rules and data_tools.build for the output folder.
"""

from __future__ import annotations

import argparse

from data_tools.config import add_build_arguments

KIND = "sft"
IMPORTER = "messages"
COMMAND = "import-messages"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_arguments(
        parser, KIND, input_flag="--jsonl", input_help="JSONL file of {\"messages\": [...]} records (a JSON array works too)",
        media_root=True,
    )


def run(args: argparse.Namespace) -> int:
    from data_tools.build import run_build_command
    from data_tools.config import config_from_args

    return run_build_command(config_from_args(args, KIND, IMPORTER), COMMAND)
