"""Import Hugging Face datasets' parquet files (images as bytes or {bytes, path} structs) as an image-text or SFT shard set.

Each row becomes one sample of the set ``build-image-text`` (--kind image_text: an image column and a text
column) or ``build-sft`` (--kind sft: a messages column, and an image column with the images its image parts
or <image> placeholders refer to) writes, after the same validation, duplicate detection and rejection
report. Files are read a few rows at a time, never whole. See data_tools.importers.parquet_rows for the
rules and data_tools.build for the output folder.
"""

from __future__ import annotations

import argparse

from data_tools.config import add_build_arguments

COMMAND = "import-parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_arguments(parser, "image_text", input_flag="--files", input_help="glob of the parquet files, quoted (** for subfolders)")
    parser.add_argument("--kind", choices=("image_text", "sft"), default="image_text", help="the shard set to build (default image_text)")
    parser.add_argument("--image-column", default=None, help="column of the images (default: image for image_text, images for sft)")
    parser.add_argument("--text-column", default="text", help="image_text: column of the captions (default text)")
    parser.add_argument("--messages-column", default="messages", help="sft: column of the conversations (default messages)")


def run(args: argparse.Namespace) -> int:
    from data_tools.build import run_build_command
    from data_tools.config import config_from_args
    from data_tools.importers.parquet_rows import ParquetSource

    config = config_from_args(args, args.kind)
    image_column = args.image_column or ("image" if args.kind == "image_text" else "images")
    source = ParquetSource(config.manifest, args.kind, image_column, args.text_column, args.messages_column)
    return run_build_command(config, COMMAND, source)
