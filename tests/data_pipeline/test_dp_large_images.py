"""An image the shard builder accepted under a raised ``--max-pixels`` is decoded by the loader and by
``data_tools verify --decode`` too (both used the default decompression-bomb limit: the sample was skipped
at every epoch, and verify called the valid set broken)."""

from __future__ import annotations

import json

from PIL import Image

from common.media.decode import DEFAULT_MAX_PIXELS
from data_tools.build import run_build
from data_tools.config import BuildConfig
from data_tools.schema import read_sample
from data_tools.shards import iter_shard
from data_tools.verify import verify
from pretrain.data.encoding import SampleEncoder, encode_schema_sample


def test_an_image_above_the_default_limit_that_the_build_allowed_is_trained_on(tmp_path, tokenizer):
    width, height = 6600, 6200  # 40.9 M pixels
    assert width * height > DEFAULT_MAX_PIXELS
    Image.new("RGB", (width, height), (200, 40, 40)).save(tmp_path / "scan.jpg", quality=60)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "scan.jpg", "text": "a red page"}) + "\n")
    out = tmp_path / "set"
    summary = run_build(BuildConfig(kind="image_text", manifest=str(tmp_path / "pairs.jsonl"), out=str(out),
                                    max_pixels=45_000_000, workers=0, progress=False))
    assert summary.samples == 1, summary

    assert verify(out, decode=True)[0] == []
    _, parts = next(iter_shard(next(out.glob("*.tar"))))
    sample, media = read_sample(parts)
    encoded = encode_schema_sample(SampleEncoder(tokenizer), sample, media)
    assert encoded.image_grid_thw.shape[0] == 1 and encoded.pixel_values.abs().sum() > 0
