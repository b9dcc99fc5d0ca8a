"""``python -m data_tools <command> [--help]``: offline data tools for Qwen3-VL training.

Each command is a module exposing ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status);
``COMMANDS`` maps command names to those modules. The first line of the module's docstring is its
one-line help, the docstring its ``--help`` description. Command modules keep heavy imports inside
``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "build-image-text": "data_tools.build_image_text",
    "build-interleaved": "data_tools.build_interleaved",
    "build-video": "data_tools.build_video",
    "build-sft": "data_tools.build_sft",
    "build-rl": "data_tools.build_rl",
    "import-llava": "data_tools.import_llava",
    "import-messages": "data_tools.import_messages",
    "import-webdataset": "data_tools.import_webdataset",
    "import-parquet": "data_tools.import_parquet",
    "inspect": "data_tools.inspect_set",
    "stats": "data_tools.stats",
    "verify": "data_tools.verify",
    "synth": "data_tools.synth",
    "train-tokenizer": "data_tools.train_tokenizer",  # owned by the tokenizer module's engineer
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or name).strip()
        command = sub.add_parser(
            name, help=doc.splitlines()[0], description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
