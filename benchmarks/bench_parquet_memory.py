"""Memory of ``import-parquet``'s reader: peak resident memory while every row of a parquet file is read
(``data_tools.importers.parquet_rows.ParquetSource.records``, the main process of the import), for files
of the same row-group size and 1x, 2x, 4x ... as many row groups.

    python benchmarks/bench_parquet_memory.py [--group-mb 50] [--groups 4,8,16] [--value-kb 1024]

Each file holds incompressible ``--value-kb`` binary cells (an image column) in row groups of
``--group-mb`` MB, written uncompressed to a temporary folder. Each file is read in a fresh process;
the figure is its peak RSS (``ru_maxrss``) minus the RSS after the imports, in MB. Streaming means
that figure follows the row-group size and stays flat as the file grows; pyarrow's defaults
(``ParquetFile(path).iter_batches()``) are measured too, for comparison.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

READER = r"""
import resource, sys
sys.path.insert(0, {repo!r})
import pyarrow.parquet as pq
from data_tools.importers.parquet_rows import ParquetSource
path, mode = sys.argv[1], sys.argv[2]
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
base = rss_mb()
rows = 0
if mode == "importer":
    source = ParquetSource(path, "image_text", "image", "text")
    source.scan()
    for _ in source.records():
        rows += 1
else:
    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches(batch_size=32):
            rows += len(batch.column("image").to_pylist())
print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3 - base)
"""


def write_file(path: Path, groups: int, rows_per_group: int, value_bytes: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for _ in range(groups):
        table = pa.table({"image": pa.array([os.urandom(value_bytes) for _ in range(rows_per_group)], pa.binary()),
                          "text": ["a caption"] * rows_per_group})
        writer = writer or pq.ParquetWriter(path, table.schema, compression="none")
        writer.write_table(table)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group-mb", type=int, default=50)
    parser.add_argument("--groups", default="4,8,16")
    parser.add_argument("--value-kb", type=int, default=1024)
    args = parser.parse_args()
    value_bytes = args.value_kb * 1024
    rows_per_group = max(1, args.group_mb * (1 << 20) // value_bytes)
    print(f"row groups of {rows_per_group} rows x {args.value_kb} KB = {rows_per_group * value_bytes / 1e6:.0f} MB")
    print(f"{'groups':>6} {'file MB':>8} {'importer peak MB':>17} {'pyarrow defaults MB':>20}")
    with tempfile.TemporaryDirectory() as tmp:
        for groups in (int(g) for g in args.groups.split(",")):
            path = Path(tmp) / f"g{groups}.parquet"
            write_file(path, groups, rows_per_group, value_bytes)
            peaks = []
            for mode in ("importer", "defaults"):
                out = subprocess.run([sys.executable, "-c", READER.format(repo=str(REPO)), str(path), mode],
                                     capture_output=True, text=True, check=True).stdout.split()
                assert int(out[0]) == groups * rows_per_group
                peaks.append(float(out[1]))
            print(f"{groups:>6} {path.stat().st_size / 1e6:>8.0f} {peaks[0]:>17.0f} {peaks[1]:>20.0f}")
            path.unlink()


if __name__ == "__main__":
    main()
