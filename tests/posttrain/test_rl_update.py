"""The RL update (pretrain.posttrain.rl_step) through Megatron's training schedule, in four layouts.

A fixed rollout batch (text prompts of different lengths, responses of different lengths, old-policy
log-probs away from the current policy so that ratios leave 1, advantages of both signs) gives the
same policy loss and gradient norm in one process, in TP2 with sequence parallelism, in EP2 (the
MoE experts split, the rows split over the two data-parallel ranks) and in PP2 (the packed micro-batches
of different row lengths padded to one shape for the stages). SAPO, GRPO and GSPO, both aggregations.
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
