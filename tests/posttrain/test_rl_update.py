"""The RL update (pretrain.posttrain.rl_step) through Megatron's training schedule, in four layouts.

A fixed rollout batch (text prompts of different lengths, responses of different lengths, old-policy
log-probs away from the current policy so that ratios leave 1, advantages of both signs) gives the
same policy loss and gradient norm in one process, in TP2 with sequence parallelism, in EP2 (the
MoE experts split, the rows split over the two data-parallel ranks) and in PP2 (the packed micro-batches
of different row lengths padded to one shape for the stages). SAPO, GRPO and GSPO, both aggregations.
Without pipeline stages each micro-batch keeps its own length.
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

LOSSES = [({"name": "sapo"}, "seq-mean-token-mean"), ({"name": "grpo", "clip_eps": 0.2}, "token-mean"),
          ({"name": "gspo", "eps_low": 0.05, "eps_high": 0.05}, "seq-mean-token-mean")]
ROWS, WIDTH = 8, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

    root = tmp_path_factory.mktemp("rl_update")
    words = "red green blue yellow circle square star moves left right up down on a the there is which way".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    tok_dir = train_byte_level_bpe(texts, 400, root / "tok").parent
    tok = Tokenizer.from_file(tok_dir / "tokenizer.json")
    vocab = tok.vocab_size + 128 - tok.vocab_size % 128
    overrides = ["model=tiny_moe", f"data.tokenizer={tok_dir}", f"model.text.vocab_size={vocab}",
                 f"model.image_token_id={tok.image_pad_id}", f"model.video_token_id={tok.video_pad_id}",
                 f"model.vision_start_token_id={tok.vision_start_id}", f"model.vision_end_token_id={tok.vision_end_id}",
                 "stage.optimizer.lr=1e-3"]
    g = torch.Generator().manual_seed(0)
    prompts = [{"input_ids": torch.tensor(tok.encode(t))}
               for t in ("red circle", "there is a blue square which moves up", "left", "which way is the star")]
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 6])
    mask = torch.arange(WIDTH)[None, :] < lengths[:, None]
    ids = torch.randint(0, tok.vocab_size, (ROWS, WIDTH), generator=g)
    ids[torch.isin(ids, torch.tensor([tok.image_pad_id, tok.video_pad_id]))] = 0  # never sampled
    batch = {
        "response_ids": ids,
        "response_mask": mask,
        "old_logp": torch.where(mask, -6.0 + 0.5 * torch.randn(ROWS, WIDTH, generator=g), 0.0),
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5, 1.2, -0.7, 0.0, 0.9]),
        "prompt_index": torch.arange(ROWS) // 2,
    }
    return overrides, prompts, batch, str(root / "weights"), tok.vocab_size


def _update(rank, overrides, parallel, prompts, batch, ckpt, vocab, save, extra=()):
    from megatron.core import parallel_state as ps

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import load_weights, save_weights
    from pretrain.cli import load_job
    from pretrain.posttrain.policy_loss import policy_loss_config_from_mapping
    from pretrain.posttrain.rl_step import PolicyLossStep, RLRows, policy_update
    from pretrain.posttrain.rollout import placeholder_ids
    from pretrain.trainer import build_training

    _, job = load_job([*overrides, f"parallel={parallel}", *extra])
    initialize_distributed(job.parallel, seed=0)
    torch.manual_seed(0)
    chunks, model, optimizer = build_training(job, torch.float32)
    if save:
        save_weights(ckpt, chunks)
    load_weights(ckpt, chunks)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = RLRows(prompts, **batch)
    share = ROWS // dp
    rows = rows.select(slice(dp_rank * share, (dp_rank + 1) * share))
    out = []
    for options, aggregation in LOSSES:
        load_weights(ckpt, chunks)  # every loss from the same weights (the optimizer state carries over: fine)
        step = PolicyLossStep(policy_loss_config_from_mapping(options), aggregation, 1.0, vocab,
                              placeholder_ids(chunks[0].cfg))
        result = policy_update(model, optimizer, rows, step, micro_batch_size=3, dtype=torch.float32)
        out.append((result.loss, result.grad_norm, step.metrics.reduce(step.present)))
    return out


def test_rl_loss_is_the_same_in_single_tp2_ep2_and_pp2(setup):
    overrides, prompts, batch, ckpt, vocab = setup
    single = run_ranks(_update, 1, overrides, "single", prompts, batch, ckpt, vocab, True)[0]
    for parallel, extra in (("tp2", ["parallel.sequence_parallel=true"]), ("ep2", []), ("pp2", [])):
        ranks = run_ranks(_update, 2, overrides, parallel, prompts, batch, ckpt, vocab, False, extra)
        assert ranks[0] == ranks[1] or all(a[0] == b[0] for a, b in zip(*ranks)), "ranks disagree on the loss"
        for (loss, norm, metrics), (want_loss, want_norm, want_metrics), (options, _) in zip(ranks[0], single, LOSSES):
            assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6), (parallel, options)
            assert norm == pytest.approx(want_norm, rel=1e-4), (parallel, options)
            assert metrics["ratio_dev_mean"] == pytest.approx(want_metrics["ratio_dev_mean"], rel=1e-4)
    # ratios really left 1 (old log-probs are not the policy's), and the losses differ by method
    assert single[0][2]["ratio_dev_mean"] > 0.1
    assert len({round(loss, 6) for loss, _, _ in single}) == 3


def _padded_and_own_length(rank, overrides, prompts, batch, ckpt, vocab):
    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import load_weights
    from pretrain.cli import load_job
    from pretrain.posttrain.policy_loss import policy_loss_config
    from pretrain.posttrain.rl_step import PolicyLossStep, RLRows, rl_micro_batches
    from pretrain.posttrain.rollout import placeholder_ids
    from pretrain.step import train_step
    from pretrain.trainer import build_training

    _, job = load_job([*overrides, "parallel=single"])
    initialize_distributed(job.parallel, seed=0)
    chunks, model, optimizer = build_training(job, torch.float32)
    # The last two rows answer a prompt ten times the longest: the other micro-batches pad a lot. With
    # advantages 0 the policy loss has no gradient: what is left is the MoE load-balancing loss's.
    long = {"input_ids": prompts[1]["input_ids"].repeat(10)}
    rows = RLRows([*prompts, long], **{**batch, "prompt_index": torch.tensor([0, 0, 1, 1, 2, 2, 4, 4]),
                                       "advantages": torch.zeros(ROWS)})
    out = {}
    for same in (False, True):
        load_weights(ckpt, chunks)
        step = PolicyLossStep(policy_loss_config("sapo"), "token-mean", 1.0, vocab, placeholder_ids(chunks[0].cfg))
        batches, length = rl_micro_batches(rows, 2, torch.float32, same_length=same)
        result = train_step(model, optimizer, step, iter(batches), len(batches), length, 1)
        padding = sum(int((b["document_ids"] < 0).sum()) for b in batches)
        out[same] = (result.loss, result.grad_norm, padding)
    return out


def test_padding_to_one_length_changes_nothing_but_the_shapes(setup):
    """The pipeline rule's padding (every micro-batch as long as the longest) is a document of its own
    that the MoE routers leave out (``padding_mask``): the loss and the gradient of the load-balancing
    loss are those of the micro-batches at their own lengths."""
    overrides, prompts, batch, ckpt, vocab = setup
    run_ranks(_update, 1, overrides, "single", prompts, batch, ckpt, vocab, True)  # writes the weights
    out = run_ranks(_padded_and_own_length, 1, overrides, prompts, batch, ckpt, vocab)[0]
    (loss, norm, own_padding), (padded_loss, padded_norm, padding) = out[False], out[True]
    assert own_padding == 0 and padding > 100 and norm > 0, out
    assert padded_loss == pytest.approx(loss, abs=1e-7) and padded_norm == pytest.approx(norm, rel=1e-5), out


@pytest.mark.parametrize("same_length", [False, True])
def test_micro_batches_are_padded_to_one_length_only_for_pipeline_stages(same_length):
    """Without pipeline parallelism each micro-batch keeps its own packed length (a group of long
    prompts' rows would otherwise make every other micro-batch mostly padding); with it (the stages
    exchange fixed shapes) every micro-batch is the longest, right-padded. Lengths are rounded up to
    ``multiple_of`` (tp with sequence parallelism) either way."""
    from pretrain.posttrain.rl_step import RLRows, rl_micro_batches

    prompts = [{"input_ids": torch.arange(1, 4)}, {"input_ids": torch.arange(1, 21)}]  # 3 and 20 tokens
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False  # row 1: 3 of its 5 tokens
    rows = RLRows(prompts, torch.full((4, 5), 7), mask, torch.zeros(4, 5), torch.zeros(4), torch.tensor([0, 0, 1, 1]))
    batches, longest = rl_micro_batches(rows, 2, torch.float32, multiple_of=4, same_length=same_length)
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert longest == 52  # 2 x (20 + 5) = 50, rounded up to 52
    assert lengths == ([52, 52] if same_length else [16, 52])  # 8 + 6 = 14 -> 16
    for b, length, real in zip(batches, lengths, (14, 50)):
        assert b["position_ids"].shape == (3, 1, length) and b["document_ids"].shape == (1, length)
        # the two rows (documents 0 and 1), then the padding (document -1, as a pack's)
        assert bool((b["document_ids"][0, :real] >= 0).all()) and bool((b["document_ids"][0, real:] == -1).all())


def test_split_rows_finds_the_shortest_longest_micro_batch():
    """The cut of rows into a given number of contiguous micro-batches is the one whose longest
    micro-batch is shortest under the cap on response tokens (against every possible cut), and a
    mixed batch (groups of text, image and video prompts' rows) no longer has one micro-batch
    several times the others."""
    import itertools
    import random

    from pretrain.posttrain.rl_step import split_rows

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        responses = [rng.randint(0, 6) for _ in range(n)]
        sizes = [r + rng.randint(1, 30) for r in responses]
        count, cap = rng.randint(1, n), rng.randint(max(responses), 2 * max(responses) + 6)
        best = None
        for inner in itertools.combinations(range(1, n), count - 1):
            cuts = [0, *inner, n]
            if all(sum(responses[a:b]) <= cap for a, b in zip(cuts, cuts[1:])):
                longest = max(sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:]))
                best = longest if best is None else min(best, longest)
        if best is None:  # no cut into `count` micro-batches keeps every one under the cap
            continue
        cuts = split_rows(sizes, responses, count, cap)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == count + 1 and cuts == sorted(set(cuts)), cuts
        assert all(sum(responses[a:b]) <= cap for a, b in zip(cuts, cuts[1:]))
        assert max(sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:])) == best, (sizes, responses, count, cap, cuts)

    # 3 groups of G = 8 rows: text, image and video prompts (37, 88, 533 tokens), responses of 68 tokens,
    # 3 micro-batches (micro_batch_size 8, the cap 8 x 128): cut every 8 rows, the video group's is 4,808
    sizes, responses = [37 + 68] * 8 + [88 + 68] * 8 + [533 + 68] * 8, [68] * 24
    cuts = split_rows(sizes, responses, 3, 8 * 128)
    assert [sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:])] == [1_932, 2_560, 2_404]  # 15 rows, 5, 4
    with pytest.raises(ValueError, match="do not split into 4"):
        split_rows([1, 2, 3], [0, 0, 0], 4, 10)


def _scored_and_updated_shapes(rank, overrides, prompts, batch, ckpt, vocab):
    from common.distributed.parallel import initialize_distributed
    from pretrain.cli import load_job
    from pretrain.posttrain.rl_step import RLRows, micro_batch_cuts, mini_batches, rl_micro_batches
    from pretrain.posttrain.rollout import sequence_logprobs
    from pretrain.trainer import build_training

    _, job = load_job([*overrides, "parallel=single"])
    initialize_distributed(job.parallel, seed=0)
    chunks, _, _ = build_training(job, torch.float32)
    long = {"input_ids": prompts[1]["input_ids"].repeat(6)}  # rows of very different lengths
    rows = RLRows([*prompts, long], **{**batch, "prompt_index": torch.tensor([0, 0, 1, 1, 4, 4, 2, 3])})
    updates, cuts = mini_batches(rows, 2, 2)
    parts = [part for part, _ in updates]
    scored = []
    hook = chunks[0].register_forward_pre_hook(lambda module, args: scored.append(tuple(args[0].shape)))
    with torch.no_grad():
        sequence_logprobs(chunks[0], rows.prompts, rows.response_ids, rows.response_mask, cuts=cuts,
                          prompt_index=rows.prompt_index, vocab_size=vocab)
    hook.remove()
    # each update's micro-batches as the RL stage builds them (policy_update with the update's cut)
    updated = [tuple(b["input_ids"].shape) for part, part_cuts in updates
               for b in rl_micro_batches(rows.select(part), 2, torch.float32, cuts=part_cuts)[0]]
    # the cut handed to each update is the one its rows alone get (policy_update's own, without cuts=)
    spans = [part_cuts for _, part_cuts in updates]
    own = [micro_batch_cuts(rows.select(p), 2) for p in parts]
    return [len(rows.select(p)) for p in parts], cuts, scored, updated, spans, own


def test_old_policy_log_probs_run_the_updates_micro_batches(setup):
    """The RL step's no-gradient log-prob passes (old policy, reference) run the micro-batches the
    optimizer steps run, mini-batch by mini-batch: each row is scored in the packed sequence it is
    trained in (on a GPU, other shapes round differently and the first update's ratios would leave 1)."""
    overrides, prompts, batch, ckpt, vocab = setup
    sizes, cuts, scored, updated, spans, own = run_ranks(_scored_and_updated_shapes, 1, overrides, prompts, batch,
                                                         ckpt, vocab)[0]
    assert sizes == [4, 4] and cuts[0] == 0 and cuts[-1] == 8 and 4 in cuts  # no micro-batch spans two updates
    assert cuts != [0, 2, 4, 6, 8]  # not every 2 rows: the long prompt's rows are cut apart
    assert len(cuts) - 1 == 4 == len(scored) and scored == updated, (cuts, scored, updated)
    assert spans == own, (spans, own)
