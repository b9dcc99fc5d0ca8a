"""The varlen form of the packed-document attention (``model.attention.attend_packed(varlen=True)``).

On CUDA in half precision every piece of every row goes to one call of PyTorch's variable-length flash
attention. That kernel runs only on a GPU (``tests/test_gpu.py`` checks it there, against the per-piece
path); what can be checked here is everything around it: the query and key offsets, the keys gathered
for context parallelism's pieces, the reshapes in and out. For that the kernel is replaced by a
reference that attends each (queries, keys) pair of the offsets on its own, lower-right causal, which
is the contract of the flash kernel; the per-piece path (one SDPA per piece, the CPU path) must then give
the same result for packed rows, the ViT's frames and both ranks of a CP2 layout.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from model import attention
from model.context_parallel import gathered_order, layout

SCALE = 16 ** -0.5


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, repeat_kv=False):
    """What the flash kernel computes: for each i, queries ``cu_q[i]:cu_q[i+1]`` over keys
    ``cu_k[i]:cu_k[i+1]``, the causal mask aligned to the lower right; ``q [Tq, hq, d]``, ``k [Tk, hk, d]``."""
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks = q[int(cu_q[i]):int(cu_q[i + 1])], k[int(cu_k[i]):int(cu_k[i + 1])]
        vs = v[int(cu_k[i]):int(cu_k[i + 1])]
        kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (ks, vs))
        scores = torch.einsum("qhd,khd->hqk", qs, kk) * scale
        if causal:
            lq, lk = qs.shape[0], ks.shape[0]
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores + torch.where(visible, 0.0, -math.inf)
        out.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv))
    return torch.cat(out)


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setattr(attention, "_varlen_call", reference_varlen)


def _segments(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Segment ids [batch, seq]: runs of 1 to 40 tokens, some of length 1."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(torch.randint(1, 41, (1,), generator=g)))
        lengths[-1] -= sum(lengths) - seq
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def _qkv(seq: int, batch: int, hq: int = 4, hk: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, hq, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(seq, batch, hk, 16, generator=g, requires_grad=True) for _ in range(2))
    return q, k, v


def _both(query, key, value, plans, order, causal):
    """Outputs and input gradients of the varlen and the per-piece path."""
    results = []
    for varlen in (True, False):
        out = attention.attend_packed(query, key, value, plans, order, causal, SCALE, varlen=varlen)
        grads = torch.autograd.grad(out, (query, key, value), torch.ones_like(out) + out.detach())
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("causal", [True, False], ids=["documents", "frames"])
def test_varlen_offsets_equal_the_per_piece_attention(reference_kernel, causal):
    batch, seq = 2, 96
    segments = _segments(batch, seq, seed=1)
    plans = attention._plan(segments, batch, seq, causal, 1, 0)
    (a, ga), (b, gb) = _both(*_qkv(seq, batch), plans, None, causal)
    assert a.shape == b.shape == (seq, batch, 4 * 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cp_rank", [0, 1])
def test_varlen_gathers_the_keys_of_context_parallel_pieces(reference_kernel, cp_rank):
    """CP2: this rank's queries (its chunks of every document) over the all-gathered keys in rank-major
    order, as DocumentAttention receives them; the pieces' key ranges overlap (a document's second chunk
    sees its first), so the varlen path gathers them by index."""
    batch, seq, cp = 2, 96, 2
    segments = _segments(batch, seq, seed=2)
    q_full, k_full, v_full = _qkv(seq, batch, seed=3)
    rank_major = layout(segments, batch, seq, cp).reshape(batch, seq)  # gathered position -> sequence position
    local = layout(segments, batch, seq, cp)[:, cp_rank]  # [b, S / cp]
    query = torch.stack([q_full[local[b], b] for b in range(batch)], dim=1).detach().requires_grad_()
    key, value = (torch.stack([t[rank_major[b], b] for b in range(batch)], dim=1).detach().requires_grad_()
                  for t in (k_full, v_full))
    plans = attention._plan(segments, batch, seq, True, cp, cp_rank)
    order = gathered_order(segments, batch, seq, cp)
    assert any(p.causal_offset for pieces in plans for p in pieces)  # pieces that start inside a document
    (a, ga), (b, gb) = _both(query, key, value, plans, order, True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_varlen_is_chosen_only_where_it_can_run():
    """On CPU, in float32 or with dropout the per-piece path runs; the check of the kernel is not even
    attempted there."""
    q, k, v = _qkv(32, 1)
    plans = attention._plan(None, 1, 32, True, 1, 0)
    before = dict(attention._VARLEN_CHECKED)
    out = attention.attend_packed(q, k, v, plans, None, True, SCALE)
    assert out.shape == (32, 1, 64) and attention._VARLEN_CHECKED == before


def test_grouped_key_value_heads_go_to_the_kernel_as_they_are_unless_it_refuses_them(monkeypatch):
    """torch before 2.12 has no enable_gqa flag but its flash kernel takes fewer key/value heads: they are
    passed as they are (repeated, the backward would keep hq/hk copies of K and V); a build that refuses
    them, forward or backward, gets them repeated; one that cannot run at all is not used."""
    def accepting(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), scale=None):
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), scale)

    def refusing(q, k, v, *args, **kwargs):
        if q.shape[1] != k.shape[1]:
            raise RuntimeError("number of heads in key/value must equal the query's")
        return accepting(q, k, v, *args, **kwargs)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    seen = []

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1]))
        return accepting(q, k, v, *args, **kwargs)

    for kernel, mode in ((accepting, "heads"), (refusing, "repeat"), (broken, None), (recording, "heads")):
        monkeypatch.setattr(attention, "_varlen_kernel", lambda kernel=kernel: (kernel, frozenset({"window_size", "scale"})))
        monkeypatch.setattr(attention, "_VARLEN_CHECKED", {})
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert attention.varlen_mode(torch.device("cpu"), torch.float32, 16, 4, 2, SCALE) == mode, kernel
    # The model's call then passes the 2 key/value heads of 4 query heads as they are.
    q, k, v = _qkv(32, 1)
    plans = attention._plan(None, 1, 32, True, 1, 0)
    monkeypatch.setattr(attention, "_VARLEN_CHECKED", {("cpu", torch.float32, 16, 4, 2, SCALE): "heads"})
    seen.clear()
    attention.attend_packed(q, k, v, plans, None, True, SCALE, varlen=True)
    assert seen == [(4, 2)]
