"""Fixtures of the SLURM tests: a real one-node SLURM cluster and tiny shard sets.

The cluster (``slurm.local_cluster.LocalSlurm``: munged, slurmctld, slurmd with 2 CPUs) is started
once per session; where it cannot be installed or started, the tests that need it are skipped with
the reason. The data are made here: ``data_tools`` synth corpus, the four shard builders, a small
byte-level BPE tokenizer.
"""

from __future__ import annotations

import pytest

CORPUS = dict(seed=5, images=12, videos=2, docs=4, sft=8, eval=1)
KINDS = ("image_text", "interleaved", "video", "sft")


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A running one-node SLURM; skips (with the reason) where SLURM cannot be installed or started."""
    from slurm.local_cluster import LocalSlurm, SlurmUnavailable

    # A short path: SLURM and munge keep socket paths under ~100 bytes.
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"a local SLURM cluster cannot run here: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Shard sets of the four kinds and a tokenizer folder; returns data overrides for the trainer."""
    from data_tools.build import run_build
    from data_tools.config import BuildConfig
    from data_tools.synth import SynthConfig, generate
    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

    root = tmp_path_factory.mktemp("slurm_data")
    generate(SynthConfig(out=str(root / "corpus"), **CORPUS), progress=False)
    for kind in KINDS:
        run_build(BuildConfig(kind=kind, manifest=str(root / "corpus" / f"{kind}.jsonl"),
                              out=str(root / "shards" / kind), workers=0, progress=False))
    texts = []
    for kind in ("image_text", "sft"):
        for line in (root / "corpus" / f"{kind}.jsonl").read_text(errors="replace").splitlines():
            texts.append(line)
    tokenizer_json = train_byte_level_bpe(texts, 512, root / "tokenizer")
    tok = Tokenizer.from_file(tokenizer_json)
    return {
        "root": root,
        "overrides": [
            f"data.root={root / 'shards'}",
            f"data.tokenizer={tokenizer_json.parent}",
            # tiny_moe's special-token ids must be the tokenizer's.
            f"model.image_token_id={tok.image_pad_id}",
            f"model.video_token_id={tok.video_pad_id}",
            f"model.vision_start_token_id={tok.vision_start_id}",
            f"model.vision_end_token_id={tok.vision_end_id}",
        ],
    }
