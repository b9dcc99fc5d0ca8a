"""Import WebDataset tar files (img2dataset's output: key.jpg + key.txt/key.json) as an image-text shard set.

Each sample of the tars (members sharing a key: one image, a ``.txt`` caption and/or a ``.json`` with the
caption in field --caption-field) becomes one sample of the set ``build-image-text`` writes, after the same
validation, duplicate detection and rejection report; a damaged or truncated tar keeps the samples before
the damage. See data_tools.importers.tar_samples for the rules and data_tools.build for the output folder.
"""

from __future__ import annotations

import argparse

from data_tools.config import add_build_arguments

KIND = "image_text"
COMMAND = "import-webdataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_arguments(
        parser, KIND, input_flag="--tars",
        input_help="glob of the tar files, quoted (e.g. '/data/laion/*.tar'; ** for subfolders)",
    )
    parser.add_argument("--caption-field", default="caption",
                        help="field of <key>.json that holds the caption (default: caption); <key>.txt when absent")


def run(args: argparse.Namespace) -> int:
    from data_tools.build import run_build_command
    from data_tools.config import config_from_args
    from data_tools.importers.tar_samples import TarSource

    config = config_from_args(args, KIND)
    return run_build_command(config, COMMAND, TarSource(config.manifest, args.caption_field))
