"""data_tools.schema: JSON round trips, validation of sample JSONs, reading WebDataset sample dicts."""

from __future__ import annotations

import json

import pytest

from data_tools import schema
from data_tools.schema import Caption, Clip, Media, Message, Part, SchemaError, Source


def image(name="img0.png") -> Media:
    return Media(name=name, type="image", format="png", sha256="ab" * 32, bytes=10, width=64, height=32, source="a.png")


def video(name="vid0.mp4") -> Media:
    return Media(name=name, type="video", format="mp4", sha256="cd" * 32, bytes=20, width=64, height=48, source="v.mp4",
                 num_frames=16, fps=8.0, duration=2.0, backend="decord")


SAMPLES = [
    schema.ImageTextSample("000000001", Source(1, "m.jsonl", "x"), (image(),), text="a red circle", image="img0.png"),
    schema.InterleavedSample("000000002", Source(2, "m.jsonl"), (image(), image("img1.jpg")),
                             segments=(Part("text", text="hi"), Part("image", image="img0.png"), Part("image", image="img1.jpg"))),
    schema.VideoSample("000000003_0001", Source(3, "m.jsonl"), (video(),), video="vid0.mp4", text=None,
                       captions=(Caption(0.0, 1.5, "moves"),), clip=Clip(1, 3, 2.0, 4.0)),
    schema.SftSample("000000004", Source(4, "m.jsonl"), (image(), video()), messages=(
        Message("system", (Part("text", text="be brief"),)),
        Message("user", (Part("image", image="img0.png"), Part("video", video="vid0.mp4"), Part("text", text="colour?"))),
        Message("assistant", (Part("text", text="red"),)),
    )),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.kind)
def test_round_trip_is_exact_and_canonical(sample):
    data = schema.sample_to_json(sample)
    assert schema.sample_from_json(data) == sample
    assert schema.sample_to_json(schema.sample_from_json(data)) == data
    assert json.loads(data)["schema_version"] == schema.SCHEMA_VERSION


def test_invalid_sample_json_is_rejected_with_the_field_named():
    good = json.loads(schema.sample_to_json(SAMPLES[0]))
    for mutate, words in [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.update(kind="audio"), "kind"),
        (lambda d: d.pop("text"), "'text'"),
        (lambda d: d.update(image="img7.png"), "img7.png"),
        (lambda d: d["media"][0].update(width="64"), "'width'"),
        (lambda d: d["source"].update(line=True), "'line'"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(SchemaError, match=words):
            schema.sample_from_dict(bad)
    with pytest.raises(SchemaError):
        schema.sample_from_json(b"{not json")


def test_an_untrained_assistant_turn_round_trips_and_loss_is_checked():
    sample = schema.SftSample("000000005", Source(5, "m.jsonl"), (), messages=(
        Message("user", (Part("text", text="hi"),)), Message("assistant", (Part("text", text="hello"),), loss=False),
        Message("user", (Part("text", text="colour?"),)), Message("assistant", (Part("text", text="red"),)),
    ))
    data = schema.sample_to_json(sample)
    assert [m.get("loss") for m in json.loads(data)["messages"]] == [None, False, None, None]  # only when False
    assert schema.sample_from_json(data) == sample and schema.sample_to_json(schema.sample_from_json(data)) == data
    assert b"loss" not in schema.sample_to_json(SAMPLES[3])  # the default is not written: older samples keep their bytes
    for index, loss, words in [(0, False, "only assistant messages take 'loss'"), (1, 0, "'loss'"), (1, "no", "'loss'")]:
        bad = json.loads(data)
        bad["messages"][index]["loss"] = loss
        with pytest.raises(SchemaError, match=f"messages\\[{index}\\].*{words}"):
            schema.sample_from_dict(bad)


def test_read_sample_returns_media_and_requires_every_member():
    sample = SAMPLES[3]
    parts = {"__key__": sample.key, "json": schema.sample_to_json(sample), "img0.png": b"i", "vid0.mp4": b"v"}
    parsed, media = schema.read_sample(parts)
    assert parsed == sample and media == {"img0.png": b"i", "vid0.mp4": b"v"}
    assert schema.read_sample({**parts, "json": json.loads(parts["json"])})[0] == sample  # already-decoded JSON
    del parts["vid0.mp4"]
    with pytest.raises(SchemaError, match="vid0.mp4"):
        schema.read_sample(parts)


def test_names():
    assert schema.sample_key(12) == "000000012" and schema.sample_key(12, 3) == "000000012_0003"
    assert schema.media_part_name("image", 2, "JPG") == "img2.jpg"
    assert schema.media_part_name("video", 0, "mp4") == "vid0.mp4"
    assert schema.split_member_name("000000012.img0.jpg") == ("000000012", "img0.jpg")
    for bad in ("noext", "a/b.json", ".json"):
        with pytest.raises(SchemaError):
            schema.split_member_name(bad)
    with pytest.raises(ValueError):
        schema.media_part_name("image", 0, "../x")
