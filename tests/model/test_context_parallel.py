"""Context parallelism on the tiny Qwen3-VL (dense and MoE): CP2 equals CP1.

Packed sequences hold text, images and a video, cut into four documents of lengths that do not divide
into 2*cp chunks (one shorter than 2*cp), so the per-document layout gives uneven chunks and spreads
leftover tokens; with images the CP ranks share the ViT (one image each where there are two, all on one
rank where there is one). The CP layouts load the single-rank model's weights from a distributed
checkpoint (the product path between layouts), then their logits and per-token losses, gathered back
into sequence order, and their gradients (summed over the CP group) must equal the single layout's.
The training forward step (``pretrain.forward``) over CP4 and CP2 x TP2 with sequence parallelism, with
full activation recomputation, on two rows of different documents and padding, must equal one rank's.
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

TOL = 1e-5
PAD = 8  # sequence lengths a multiple of 2 * cp * tp for every layout here


def _documents(seq: int) -> torch.Tensor:
    """Four documents whose lengths are not multiples of 2*cp (one shorter than 2*cp = 4 tokens), so each
    is cut into uneven chunks and the leftover tokens go to the rank holding fewest."""
    ids = torch.zeros(1, seq, dtype=torch.long)
    ids[:, seq // 4 + 1:] = 1
    ids[:, 5 * seq // 8 + 1:] = 2
    ids[:, 5 * seq // 8 + 4:] = 3
    return ids


def _run(rank, model_name, layout, ckpt, save):
    import re

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from common.distributed.parallel import initialize_distributed
    from model.check_parity import parity_inputs
    from model.checkpoint_io import load_weights, save_weights
    from model.context_parallel import gather_on_this_rank
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config

    initialize_distributed(layout)
    cfg = get_config(model_name)
    torch.manual_seed(0)
    model = build_qwen3vl(cfg, parallel_output=False, sequence_parallel=layout.get("sequence_parallel", False))
    if save:
        save_weights(ckpt, [model])
    else:
        load_weights(ckpt, [model])
    out = {}
    for x in parity_inputs(cfg, seed=0, pad_multiple=PAD):
        docs = _documents(x.input_ids.shape[1])
        labels = torch.roll(x.input_ids, -1, dims=1)
        with torch.no_grad():
            logits = gather_on_this_rank(model(x.input_ids, **x.model_kwargs(), document_ids=docs), 1, docs)
        model.zero_grad()
        losses = model(x.input_ids, **x.model_kwargs(), document_ids=docs, labels=labels)
        losses.sum().backward()
        grads = {}
        for name, p in model.named_parameters():
            # A rank that encoded no image has no ViT gradient: zeros, as in Megatron's gradient buffer.
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            if ".local_experts." in name:
                # An expert's gradient is whole on the rank that holds it (tokens of every CP rank are
                # dispatched to it); name it by its global expert index.
                local = cfg.text.num_experts // ps.get_expert_model_parallel_world_size()
                name = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{ps.get_expert_model_parallel_rank() * local + int(m.group(1))}.", name)
            elif ps.get_context_parallel_world_size() > 1:
                dist.all_reduce(g, group=ps.get_context_parallel_group())  # as Megatron's DDP over DP x CP
            grads[name] = g
        out[x.name] = (logits, gather_on_this_rank(losses.detach(), 1, docs), grads)
    return out


@pytest.fixture(scope="module", params=["tiny_dense", "tiny_moe"])
def single(request, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("cp") / request.param
    return request.param, ckpt, run_ranks(_run, 1, request.param, {}, str(ckpt), True)[0]


def _compare(reference, result, layout, grads=True):
    for name, (logits, losses, ref_grads) in reference.items():
        got_logits, got_losses, got_grads = result[name]
        assert got_logits.shape == logits.shape
        diff = (got_logits - logits).abs().max().item()
        assert diff <= TOL, f"{layout} {name}: max |logit diff| {diff:.2e}"
        diff = (got_losses - losses).abs().max().item()
        assert diff <= TOL, f"{layout} {name}: max |token loss diff| {diff:.2e}"
        if not grads:
            continue
        compared = 0
        for pname, g in ref_grads.items():
            if pname in got_grads and got_grads[pname].shape == g.shape:  # whole (not split) parameters
                gdiff = (got_grads[pname] - g).abs().max().item()
                assert gdiff <= TOL * max(1.0, g.abs().max().item()), f"{layout} {name} {pname}: {gdiff:.2e}"
                compared += 1
        assert compared >= len(ref_grads) // 2, f"{layout}: only {compared} of {len(ref_grads)} gradients compared"


def test_cp2_equals_cp1(single):
    model_name, ckpt, reference = single
    layout = {"cp": 2, "ep": 2} if model_name == "tiny_moe" else {"cp": 2}
    result = [r for r in run_ranks(_run, 2, model_name, layout, str(ckpt), False) if r is not None][0]
    _compare(reference, result, layout)


def test_cp2_tp2_sequence_parallel_equals_cp1(single):
    model_name, ckpt, reference = single
    layout = {"cp": 2, "tp": 2, "sequence_parallel": True}
    if model_name == "tiny_moe":
        layout["ep"] = 2
    result = run_ranks(_run, 4, model_name, layout, str(ckpt), False)[0]
    _compare(reference, result, layout, grads=False)


def _vit_over_cp(rank, grids):
    from common.distributed.parallel import initialize_distributed
    from model.context_parallel import encode_over_cp, image_owners
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config

    initialize_distributed({"cp": 2})
    cfg = get_config("tiny_dense")
    torch.manual_seed(0)
    vision = build_qwen3vl(cfg).vision.eval()
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, generator=torch.Generator().manual_seed(1))
    merge = cfg.vision.spatial_merge_size
    with torch.no_grad():
        embeds, deep = encode_over_cp(vision, pixels, grid, merge, cfg.vision.out_hidden_size, cfg.num_deepstack)
        whole, whole_deep = vision(pixels, grid)  # this rank's ViT on every image
    held = [0, 0]
    for owner, g in zip(image_owners(grid.prod(-1).tolist(), 2), grids):
        held[owner] += g[0] * g[1] * g[2] // merge ** 2
    diffs = [(embeds - whole).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(deep, whole_deep)]
    return held, diffs


def test_vit_shared_over_cp_gives_each_image_its_own_features_when_the_later_rank_holds_more():
    """Images of 16, 12 and 12 patches (4, 3 and 3 tokens): the largest goes to rank 0, the other two to
    rank 1, which holds more tokens. The all-gather pads every rank's part to the busiest one's, so
    rank 1's tokens start at that length in the gathered rows (not after rank 0's 4 tokens); every
    image's embeddings and DeepStack features must be those of the ViT on all images. The parity
    inputs never give a later rank more tokens than rank 0, so the CP model tests do not see this."""
    grids = [[1, 4, 4], [1, 2, 6], [1, 6, 2]]
    for held, diffs in run_ranks(_vit_over_cp, 2, grids):
        assert held == [4, 6]  # not vacuous: rank 1's part is the longer one
        assert len(diffs) > 1 and max(diffs) <= TOL, diffs


def test_attention_pieces_cover_every_query_once():
    from model.attention import attention_pieces
    from model.context_parallel import rank_positions

    segments = [0] * 5 + [1] * 9 + [2] * 2  # 16 tokens, cp = 2
    layout = rank_positions(segments, 16, 2)
    # document 0 (5 tokens): chunks 2,1,1,1 (the leftover token to rank 0); document 1 (9): 2,3,2,2 (to
    # rank 1, which held fewer); document 2 (2 tokens): one each
    assert layout.tolist() == [[0, 1, 4, 5, 6, 12, 13, 14], [2, 3, 7, 8, 9, 10, 11, 15]]
    for rank in range(2):
        pieces = attention_pieces(segments, causal=True, positions=layout[rank].tolist())
        rows = [r for p in pieces for r in range(p.q_start, p.q_end)]
        assert rows == list(range(8))
        for p in pieces:
            assert segments[p.k_start] == segments[p.k_end - 1]  # keys stay within one document
    pieces = attention_pieces(segments, causal=True, positions=layout[1].tolist())
    assert [(p.q_start, p.q_end, p.k_start, p.k_end, p.causal_offset) for p in pieces] == [
        (0, 2, 0, 4, 2), (2, 7, 5, 12, 2), (7, 8, 14, 16, 1)]
    pieces = attention_pieces(segments, causal=False)
    assert [(p.q_start, p.q_end, p.k_start, p.k_end, p.causal_offset) for p in pieces] == [
        (0, 5, 0, 5, None), (5, 14, 5, 14, None), (14, 16, 14, 16, None)]


def test_padding_attends_in_blocks_and_real_tokens_see_what_they_saw():
    """A padding run (segment id < 0) is cut into segments of at most PADDING_BLOCK tokens: its attention
    grows linearly with its length, not with its square; with context parallelism's layout too, every
    query is in one piece and a piece's keys stay inside a block. The documents' outputs are those of
    padding as one segment (a dense mask over the same ids)."""
    import torch.nn.functional as F

    from model.attention import PADDING_BLOCK, _plan, attend_packed, attention_pieces
    from model.context_parallel import rank_positions

    seq = 2 * PADDING_BLOCK + 100
    segments = torch.tensor([0] * 40 + [1] * 60 + [-1] * (seq - 100))
    for positions in (None, rank_positions(segments, seq, 2)[1].tolist()):
        pieces = attention_pieces(segments, causal=True, positions=positions)
        rows = [r for p in pieces for r in range(p.q_start, p.q_end)]
        assert rows == list(range(len(rows)))
        assert len(rows) == (seq if positions is None else seq // 2)
        for p in pieces:
            if segments[p.k_start] < 0:
                assert p.k_end - p.k_start <= PADDING_BLOCK and bool((segments[p.k_start:p.k_end] < 0).all())
            else:
                assert segments[p.k_start] == segments[p.k_end - 1]
    assert max(p.k_end - p.k_start for p in attention_pieces(segments, causal=True)) <= PADDING_BLOCK

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, 1, 4, 16, generator=g) for _ in range(3))
    ids = segments[None]
    out = attend_packed(q, k, v, _plan(ids, 1, seq, True, 1, 0), None, True, 0.25, varlen=False)
    visible = (ids[0][:, None] == ids[0][None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    reference = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                               attn_mask=visible, scale=0.25)
    reference = reference.permute(2, 0, 1, 3).reshape(seq, 1, -1)
    assert (out[:100] - reference[:100]).abs().max().item() <= 1e-6  # the documents: unchanged
    assert bool(out.isfinite().all())


def _causal_pairs(segments: list[int], positions: list[int]) -> int:
    """Attention work of a rank: the (query, key) pairs its queries attend to."""
    starts, start = {}, 0
    for i, s in enumerate(segments):
        if i == 0 or s != segments[i - 1]:
            start = i
        starts[i] = start
    return sum(p - starts[p] + 1 for p in positions)


def test_cp_layout_is_megatrons_for_one_document_and_balanced_for_any_pack():
    import random

    from model.context_parallel import rank_positions

    # One document a multiple of 2*cp long: chunks r and 2*cp-1-r (Megatron's get_batch_on_this_cp_rank).
    for cp in (2, 4):
        chunk = 3
        layout = rank_positions(None, 2 * cp * chunk, cp)
        for r in range(cp):
            expected = list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk,
                                                                             (2 * cp - r) * chunk))
            assert layout[r].tolist() == expected
    # Any pack: every token on exactly one rank, the same count per rank, and the same attention work up
    # to the leftover tokens (at most 2 per document and rank, each worth at most its document's length,
    # and the chunks they shift).
    rng = random.Random(0)
    for _ in range(300):
        cp = rng.choice([2, 3, 4, 8])
        seq = 2 * cp * rng.randint(1, 64)
        cuts = sorted(rng.sample(range(1, seq), k=min(seq - 1, rng.randint(0, 12))))
        segments = [i for i, (a, b) in enumerate(zip([0] + cuts, cuts + [seq])) for _ in range(b - a)]
        layout = rank_positions(segments, seq, cp)
        assert sorted(layout.flatten().tolist()) == list(range(seq))
        work = [_causal_pairs(segments, layout[r].tolist()) for r in range(cp)]
        assert max(work) - min(work) <= 2 * seq, (cp, seq, cuts, work)
    # One long document and short ones: the pairing per document balances what a cut of the whole pack
    # (the layout of a row without document ids) does not.
    segments = [0] * 96 + [i for i in range(1, 9) for _ in range(4)]  # 128 tokens, cp = 2
    per_document = [_causal_pairs(segments, rank_positions(segments, 128, 2)[r].tolist()) for r in range(2)]
    whole_pack = [_causal_pairs(segments, rank_positions(None, 128, 2)[r].tolist()) for r in range(2)]
    assert abs(per_document[0] - per_document[1]) <= 0.02 * sum(per_document), per_document
    assert abs(whole_pack[0] - whole_pack[1]) >= 0.3 * sum(whole_pack), whole_pack


def test_queries_inside_a_document_keep_linear_memory_for_the_backward_pass():
    """A run of queries starting inside a document (lower-right causal mask): the output and gradients
    of the explicit-mask reference, while what autograd keeps grows with queries + keys, not with their
    product (PyTorch's CPU kernel keeps its float mask: 31 MB here, 16 GB per layer at 256K/cp8)."""
    import math

    from model.attention import _attend

    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 16
    for offset, queries in ((2048, 2048), (100, 300), (5000, 40)):
        keys = offset + queries
        q = torch.randn(heads, queries, dim, requires_grad=True)
        k, v = (torch.randn(kv_heads, keys, dim, requires_grad=True) for _ in range(2))
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _attend(q, k, v, offset, 0.25, 0.0)
        inputs = sum(t.numel() * 4 for t in (q, k, v))
        assert sum(kept.values()) <= 2 * inputs, (offset, queries, sum(kept.values()), inputs)
        kk, vv = (t.repeat_interleave(heads // kv_heads, 0) for t in (k, v))
        visible = torch.arange(keys)[None, :] <= torch.arange(queries)[:, None] + offset
        scores = (q @ kk.transpose(1, 2)) * 0.25 + torch.where(visible, 0.0, -math.inf)
        reference = torch.softmax(scores, -1) @ vv
        assert (out - reference).abs().max() <= 1e-5
        grad = torch.randn_like(out)
        got_grads = torch.autograd.grad(out, (q, k, v), grad)
        for got, want in zip(got_grads, torch.autograd.grad(reference, (q, k, v), grad)):
            assert (got - want).abs().max() <= 1e-5


def test_cp_refuses_a_sequence_that_does_not_split():
    from model.context_parallel import check_sequence_length

    with pytest.raises(ValueError, match="sequence length 30 is not divisible by 2\\*cp = 4"):
        check_sequence_length(30, 2)


def test_cp_needs_the_document_attention_backend():
    from model.layer_specs import resolve_attention_backend

    assert resolve_attention_backend(None, context_parallel=2) == "document"
    with pytest.raises(ValueError, match="context parallelism \\(cp=2\\) runs on the 'document' attention backend"):
        resolve_attention_backend("dense_mask", context_parallel=2)
    with pytest.raises(ValueError, match="is not one of"):
        resolve_attention_backend("flash", context_parallel=1)


def test_check_parity_in_context_parallel_layouts(tmp_path):
    """The parity command against transformers with --cp 2 (dense), and CP2 x EP2 (MoE)."""
    import json
    import subprocess
    import sys

    from model.check_parity import check
    from tests.model import tiny_hf

    dense = tiny_hf.save_reference("dense", tmp_path / "dense")
    done = subprocess.run([sys.executable, "-m", "model.check_parity", "--hf", str(dense), "--cp", "2",
                           "--json", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layout"]["cp"] == 2 and report["worst"] <= TOL

    moe = tiny_hf.save_reference("moe", tmp_path / "moe")
    report = check(str(moe), cp=2, ep=2)
    assert set(report) == {"text", "one_image", "two_images", "video", "interleaved"}
    assert max(r["max_abs_diff"] for r in report.values()) <= TOL


def _plan_builds(rank, recompute: bool, cp: int):
    """How many times one forward + backward of a packed two-document row derives attention pieces and
    context-parallel layouts, with or without full activation recomputation."""
    import model.attention as attention
    import model.context_parallel as context_parallel
    from common.distributed.parallel import initialize_distributed
    from model.check_parity import parity_inputs
    from model.qwen3vl import build_qwen3vl
    from model.registry import get_config

    initialize_distributed({"cp": cp})
    counts = {"pieces": 0, "layouts": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    attention.attention_pieces = counted("pieces", attention.attention_pieces)
    context_parallel.rank_positions = counted("layouts", context_parallel.rank_positions)
    cfg = get_config("tiny_dense")
    overrides = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    torch.manual_seed(0)
    model = build_qwen3vl(cfg, config_overrides=overrides if recompute else None)
    x = parity_inputs(cfg, seed=0, pad_multiple=PAD)[-1]  # interleaved: images, a video, text
    docs = _documents(x.input_ids.shape[1])
    model(x.input_ids, **x.model_kwargs(), document_ids=docs, labels=torch.roll(x.input_ids, -1, 1)).sum().backward()
    return counts


@pytest.mark.parametrize("cp", [1, 2])
def test_activation_recompute_reuses_the_forwards_attention_plans(cp):
    """Recomputation's backward gets detached aliases of the layers' inputs: the attention pieces and the
    CP layout derived from the segment ids in the forward are found again, not rebuilt once per layer."""
    plain = run_ranks(_plan_builds, cp, False, cp)
    recomputed = run_ranks(_plan_builds, cp, True, cp)
    assert plain == recomputed
    assert plain[0]["pieces"] > 0 and (cp == 1 or plain[0]["layouts"] > 0)


RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def _two_row_pack() -> tuple:
    """(config, micro-batch as the loader gives it) of the tiny dense model: two rows of the interleaved
    input (two images, a four-frame video, text) cut into different documents, of lengths that are not
    multiples of 2*cp (one of 3 tokens), row 1 ending in 13 tokens of padding (document id -1), random
    loss weights (0 on padding). The rows' layouts differ, so every CP cut is per row."""
    from model.check_parity import parity_inputs
    from model.registry import get_config

    cfg = get_config("tiny_dense")
    x = parity_inputs(cfg, seed=0, pad_multiple=PAD)[-1]
    s = x.input_ids.shape[1]
    ids = torch.zeros(2, s, dtype=torch.long)
    ids[0, 7:], ids[0, s // 2 + 3:], ids[0, s - 3:] = 1, 2, 3
    ids[1, 5:], ids[1, s - 13:] = 1, -1
    tokens = x.input_ids.repeat(2, 1)
    weights = torch.rand(2, s, generator=torch.Generator().manual_seed(3)) * (ids >= 0)
    batch = dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), position_ids=x.position_ids.repeat(1, 2, 1),
                 document_ids=ids, loss_weights=weights, loss_mask=(weights > 0).float())
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        batch[key] = torch.cat([getattr(x, key)] * 2)
    return cfg, batch


def _forward_step(rank, layout: dict, recompute: bool, reference: dict | None):
    """One micro-batch of :func:`_two_row_pack` through the training forward step (``pretrain.forward``:
    the model's CP cut, the loss weights cut to match) and its backward. Returns the weighted loss and
    token count summed over the CP group and, without ``reference``, the whole gradients; with it (a
    one-rank run's), the largest |difference| of this rank's gradients, summed over CP as Megatron's DDP
    does (and over TP for sequence-parallel norms, as its finalize_model_grads does), from the
    reference's part for this rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from common.distributed.parallel import initialize_distributed
    from model.hf_adapter import local_shard
    from model.qwen3vl import build_qwen3vl
    from pretrain.forward import qwen3vl_forward_step

    initialize_distributed(layout)
    cfg, batch = _two_row_pack()
    torch.manual_seed(0)
    model = build_qwen3vl(cfg, parallel_output=False, sequence_parallel=layout.get("sequence_parallel", False),
                          config_overrides=RECOMPUTE if recompute else None)
    output, loss = qwen3vl_forward_step(iter([batch]), model, use_packed_seq_params=False)
    weighted, tokens, _ = loss(output)
    weighted.backward()
    totals = torch.stack([weighted.detach(), tokens.float()])
    dist.all_reduce(totals, group=ps.get_context_parallel_group())
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # a ViT that encoded nothing
        dist.all_reduce(g, group=ps.get_context_parallel_group())
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        grads[name] = g if reference is None else (g - local_shard(name, reference[name], p)).abs().max().item()
    return totals.tolist(), grads


@pytest.fixture(scope="module")
def one_rank_step():
    return run_ranks(_forward_step, 1, {}, False, None)[0]


@pytest.mark.parametrize("layout", [{"cp": 4}, {"cp": 2, "tp": 2, "sequence_parallel": True}],
                         ids=["cp4", "cp2_tp2_sp"])
def test_training_step_over_cp_with_recompute_equals_one_rank(one_rank_step, layout):
    """The training forward step (the loss weights cut as the model cuts the tokens) over 4 CP ranks, and
    over 2 CP x 2 TP ranks with sequence parallelism, with full activation recomputation: the weighted
    loss, its token count and every gradient of the one-rank step without recomputation, for two rows
    whose documents (some shorter than 2*cp, padding) and media (images, video frames shared over the
    CP ranks' ViTs) differ."""
    (loss, tokens), whole = one_rank_step
    for (got_loss, got_tokens), diffs in run_ranks(_forward_step, 4, layout, True, whole):
        assert got_tokens == tokens and abs(got_loss - loss) <= TOL * abs(loss), (got_loss, loss)
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= TOL * max(1.0, whole[worst].abs().max().item()), (layout, worst, diffs[worst])
        assert set(diffs) == set(whole)


def test_plans_follow_an_in_place_change_of_the_document_ids():
    """The CP layout and the attention pieces cached with a document-id tensor are those of its values now:
    the same tensor refilled in place (a reused buffer) and its detached aliases get the new
    documents' plans, not the old ones."""
    from model.attention import _plan, attention_pieces
    from model.context_parallel import layout, rank_positions

    ids = torch.zeros(1, 16, dtype=torch.long)
    layout(ids, 1, 16, 2), _plan(ids, 1, 16, True, 2, 1)
    ids[0, 5:] = 1
    want = rank_positions(ids[0], 16, 2)
    for t in (ids, ids.detach()):
        assert torch.equal(layout(t, 1, 16, 2)[0], want)
        assert _plan(t, 1, 16, True, 2, 1)[0] == attention_pieces(ids[0], True, want[1])
