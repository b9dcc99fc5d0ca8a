"""A built set loads with megatron-energon's own loader, no further preparation step."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import yaml
from megatron.energon import (
    Cooker,
    DefaultTaskEncoder,
    Sample,
    WorkerConfig,
    basic_sample_keys,
    get_loader,
    get_train_dataset,
    stateless,
)

from data_tools.schema import read_sample


@dataclasses.dataclass
class CookedSample(Sample):
    kind: str
    key: str
    json_kind: str
    media_sha256: dict


@stateless
def cook(raw: dict) -> CookedSample:
    """A trivial cooker: parse the sample with data_tools.schema and hash its media bytes."""
    sample, media = read_sample(raw)
    return CookedSample(
        **basic_sample_keys(raw), kind=raw["__subflavors__"]["kind"], key=sample.key, json_kind=sample.kind,
        media_sha256={name: hashlib.sha256(data).hexdigest() for name, data in media.items()},
    )


class RawBytesTaskEncoder(DefaultTaskEncoder):
    cookers = [Cooker(cook)]
    decoder = None  # hand the cooker the raw member bytes

    def batch(self, samples):
        return samples


@pytest.mark.filterwarnings("ignore:.pin_memory. argument is set as true:UserWarning")
@pytest.mark.parametrize("kind", ["image_text", "video", "sft"])
def test_energon_loader_yields_every_sample_with_json_and_media(kind, built_sets):
    out = built_sets[kind]
    meta = out / ".nv-meta"
    assert yaml.safe_load((meta / "dataset.yaml").read_text()) == {
        "__module__": "megatron.energon", "__class__": "CrudeWebdataset", "subflavors": {"kind": kind}}
    index = json.loads((out / "index.json").read_text())
    assert json.loads((meta / ".info.json").read_text())["shard_counts"] == {s["name"]: s["samples"] for s in index["shards"]}
    assert yaml.safe_load((meta / "split.yaml").read_text())["split_parts"]["train"]

    dataset = get_train_dataset(
        out, worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0), batch_size=None,
        shuffle_buffer_size=None, max_samples_per_sequence=None, task_encoder=RawBytesTaskEncoder(), repeat=False,
    )
    loaded = {s.key: s for s in get_loader(dataset)}
    assert len(loaded) == index["totals"]["samples"]
    from data_tools.schema import sample_from_json
    from data_tools.shards import iter_shard

    for shard in index["shards"]:
        for key, parts in iter_shard(out / shard["name"]):
            sample = sample_from_json(parts["json"])
            got = loaded[key]
            assert got.kind == got.json_kind == kind and got.__key__ == key
            assert got.media_sha256 == {m.name: m.sha256 for m in sample.media}
            assert set(got.media_sha256) == set(parts) - {"json"}
