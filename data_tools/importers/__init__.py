"""Importers: other datasets' record layouts translated into a build kind's manifest record.

An importer is a module exposing ``translate(record: dict) -> dict``: one parsed input record (a
JSONL line or a JSON array element) in, the equivalent manifest record of the kind its command builds
out (for ``import-llava`` and ``import-messages``: a ``build-sft`` line, see data_tools.kinds.sft), or
``Rejected(reason, detail)`` for a record it cannot translate. It checks only what the translation
needs; everything else (fields, texts, media files, duplicates) is checked by the kind and the build
driver exactly as for a native manifest, so an import writes the shard set that ``build-<kind>``
writes from the translated records (data_tools.build runs both).

Container importers read inputs that are not manifest lines: ``tar_samples`` (``import-webdataset``)
and ``parquet_rows`` (``import-parquet``) are each a ``data_tools.build.RecordSource``; their
``translate`` runs in the workers and returns the kind's record together with its media as bytes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from data_tools.kinds import maker
from data_tools.sample_media import LineContext, LineSamples

#: importer name -> module.
IMPORTERS = {"llava": "data_tools.importers.llava", "messages": "data_tools.importers.messages"}


def importer_maker(name: str, kind: str) -> Callable[[dict, LineContext], LineSamples]:
    """``make_samples`` of ``kind`` applied to the records that importer ``name`` translates."""
    translate = importlib.import_module(IMPORTERS[name]).translate
    make = maker(kind)

    def make_samples(record: dict, ctx: LineContext) -> LineSamples:
        return make(translate(record), ctx)

    return make_samples
