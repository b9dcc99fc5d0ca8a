"""On the transformer-engine backend the decoder sees a pack's documents only through THD parameters
(``packed_seq_params``): a caller that passes ``document_ids`` alone (the RL update and its log-prob
passes, evaluate's choice scores) must get them built from the ids, or every row of a pack attends to
the rows before it. transformer-engine cannot be installed here: the test builds the tiny model on the
document backend, switches its ``attention`` to ``te`` and records what the decoder is given."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks


class _Recorded(Exception):
    pass


def _decoder_inputs(rank):
    from common.distributed.parallel import initialize_distributed
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config

    initialize_distributed({})
    model = build_qwen3vl(get_config("tiny_dense")).eval()
    model.attention = "te"
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        raise _Recorded

    model.decoder.forward = record
    ids = torch.randint(10, 100, (1, 7))
    documents = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    with torch.no_grad(), pytest.raises(_Recorded):
        model(ids, document_ids=documents)
    thd = seen["packed_seq_params"]
    out = {"mask": seen["attention_mask"], "cu_q": thd.cu_seqlens_q.tolist(), "cu_kv": thd.cu_seqlens_kv.tolist(),
           "max": (thd.max_seqlen_q, thd.max_seqlen_kv), "format": thd.qkv_format}
    with torch.no_grad(), pytest.raises(ValueError, match="micro_batch_size=1") as error:
        model(torch.randint(10, 100, (2, 7)), document_ids=documents.expand(2, 7))
    out["two_rows"] = str(error.value)
    return out


def test_te_backend_builds_thd_boundaries_from_document_ids():
    out = run_ranks(_decoder_inputs, 1)[0]
    assert out["mask"] is None and out["format"] == "thd"
    assert out["cu_q"] == out["cu_kv"] == [0, 3, 5, 7]  # two documents, then the padding run
    assert out["max"] == (3, 3)
    assert "(2, 7)" in out["two_rows"]
