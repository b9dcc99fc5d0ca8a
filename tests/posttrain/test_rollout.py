"""Rollouts (pretrain.posttrain.rollout) on the tiny Qwen3-VL-MoE with random weights.

One single-rank process runs every one-layout check on the same model (text prompts of different
lengths, an image prompt and a video prompt, G responses each); a two-rank process then loads the
same weights in TP2 with sequence parallelism, in EP2 (the two ranks holding different prompts) and
in PP2, and must sample the same responses. Log-probs are compared at 1e-5 (float32).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.posttrain.rollout import RolloutConfig
from tests.multirank import run_ranks

TOL = 1e-5
NEW = 10  # max_new_tokens
G = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

    words = "red green blue yellow circle square star moves left right up down on a the there is which way".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    return Tokenizer.from_file(train_byte_level_bpe(texts, 400, tmp_path_factory.mktemp("rollout_tok")))


def _model_config(tokenizer):
    """tiny_moe on the test tokenizer; its vocabulary is padded beyond the tokenizer's (never sampled).
    Three DeepStack features over four decoder layers: with pp=2 the third travels to the second stage."""
    from model.registry import get_config

    cfg = get_config("tiny_moe")
    vocab = tokenizer.vocab_size + 64 - tokenizer.vocab_size % 64
    vision = dataclasses.replace(cfg.vision, depth=3, deepstack_visual_indexes=(0, 1, 2))
    return dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab), vision=vision, image_token_id=tokenizer.image_pad_id,
        video_token_id=tokenizer.video_pad_id, vision_start_token_id=tokenizer.vision_start_id,
        vision_end_token_id=tokenizer.vision_end_id)


def _prompts(tokenizer) -> list[dict]:
    """Two text prompts of different lengths, an image prompt and a video prompt (SFT chat template)."""
    import numpy as np
    import PIL.Image

    from common.media.frame_sampling import VideoClip
    from common.media.vision_inputs import VisionInputConfig
    from pretrain.data.encoding import EncodingConfig, SampleEncoder
    from pretrain.generate import InferenceModel, encode_prompt

    rng = np.random.default_rng(0)
    vision = VisionInputConfig(image_min_pixels=1024, image_max_pixels=4096, video_min_pixels=1024,
                               video_max_pixels=8192)
    im = InferenceModel(None, tokenizer, SampleEncoder(tokenizer, EncodingConfig(vision=vision)), None, None)
    image = PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    clip = VideoClip(rng.integers(0, 255, (4, 32, 64, 3), dtype=np.uint8), np.arange(4) / 2.0)
    return [
        {"input_ids": torch.tensor(tokenizer.encode("red circle"))},
        encode_prompt(im, image, "image", "which way is the star"),
        {"input_ids": torch.tensor(tokenizer.encode("there is a blue square on the left which moves up"))},
        encode_prompt(im, clip, "video", "which way does it move"),
    ]


def _stop_token(greedy, lengths_at_least: int = 3):
    """A token that greedy row 0 first emits at step >= 2 (so it cuts that response short)."""
    ids = greedy.response_ids[0].tolist()
    for t in range(2, len(ids)):
        if ids[t] not in ids[:t]:
            return ids[t], t
    raise AssertionError(f"greedy row 0 repeats itself: {ids}")


# ----------------------------------------------------------------------------------------------------
# rank bodies


def _build(cfg, layout, ckpt=None, save=False, attention=None):
    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import load_weights, save_weights
    from model.qwen3vl import build_qwen3vl

    initialize_distributed(layout)
    torch.manual_seed(0)
    model = build_qwen3vl(cfg, sequence_parallel=layout.get("sequence_parallel", False), attention=attention)
    if save:
        save_weights(ckpt, [model])
    elif ckpt is not None:
        load_weights(ckpt, [model])
    return model


def _single(rank, cfg, tokenizer, prompts, ckpt):
    from model.qwen3vl import build_qwen3vl
    from pretrain.posttrain.rollout import generate_rollouts, sequence_logprobs

    model = _build(cfg, {}, ckpt, save=True)
    model.train()
    out = {}
    greedy = RolloutConfig(temperature=0, max_new_tokens=NEW, group_size=G, stop_tokens=())
    out["greedy"] = generate_rollouts(model, prompts, greedy, tokenizer)
    out["greedy_recompute"] = generate_rollouts(model, prompts, greedy, tokenizer, use_cache=False)
    out["training_after"] = model.training and all(m.training for m in model.modules())

    sampled = RolloutConfig(temperature=1.0, max_new_tokens=NEW, group_size=G, seed=1)
    out["sampled"] = generate_rollouts(model, prompts, sampled, tokenizer, step=3)
    out["sampled_again"] = generate_rollouts(model, prompts, sampled, tokenizer, step=3)
    out["sampled_recompute"] = generate_rollouts(model, prompts, sampled, tokenizer, step=3, use_cache=False)
    out["sampled_seed2"] = generate_rollouts(model, prompts, dataclasses.replace(sampled, seed=2), tokenizer, step=3)
    out["sampled_step4"] = generate_rollouts(model, prompts, sampled, tokenizer, step=4)
    out["sampled_reversed"] = generate_rollouts(model, prompts[::-1], sampled, tokenizer, step=3,
                                                prompt_keys=[3, 2, 1, 0])
    out["top_p_tiny"] = generate_rollouts(model, prompts, dataclasses.replace(sampled, top_p=1e-6), tokenizer)
    warm = dataclasses.replace(sampled, temperature=0.7, top_p=0.9)
    out["warm"] = generate_rollouts(model, prompts, warm, tokenizer)

    with torch.no_grad():
        out["logprobs"] = sequence_logprobs(model, prompts, out["sampled"])
        out["entropy"] = sequence_logprobs(model, prompts, out["sampled"], with_entropy=True)[1]
        out["logprobs_warm"] = sequence_logprobs(model, prompts, out["warm"], micro_batch_size=3)
        out["logprobs_greedy"] = sequence_logprobs(model, prompts, out["greedy"])
        # The image matters: the same responses after another image are less or more likely.
        other = dict(prompts[1], pixel_values=-prompts[1]["pixel_values"])
        rows = slice(G, 2 * G)
        out["logprobs_other_image"] = sequence_logprobs(
            model, [other], out["sampled"].response_ids[rows], out["sampled"].response_mask[rows],
            vocab_size=tokenizer.vocab_size)
    # With gradients (the policy's log-probs in the loss).
    logp = sequence_logprobs(model, prompts, out["sampled"])
    logp.sum().backward()
    out["grad_norm"] = float(sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5)

    stop_id, stop_at = _stop_token(out["greedy"])
    out["stop"] = (stop_id, stop_at)
    stopping = dataclasses.replace(greedy, stop_tokens=(tokenizer.id_to_token(stop_id),))
    out["stopped"] = generate_rollouts(model, prompts, stopping, tokenizer)
    out["stopped_recompute"] = generate_rollouts(model, prompts, stopping, tokenizer, use_cache=False)

    # The dense-mask backend generates with document attention swapped in, then gets its own back.
    other = build_qwen3vl(cfg, attention="dense_mask")
    other.load_state_dict(model.state_dict())
    out["dense_mask"] = generate_rollouts(other, prompts, greedy, tokenizer)
    out["dense_mask_restored"] = (other.attention, type(other.decoder.layers[0].self_attention.core_attention).__name__)

    # Rows of one prompt share its ViT pass (image_index / video_index): the same logits and the same
    # gradient as with each row carrying its own copy of the media.
    from pretrain.posttrain.rollout import _media, _prompts, response_rows

    items, index = _prompts(prompts), torch.tensor([1, 3, 1, 0, 3, 3])
    shared, _ = response_rows(items, torch.zeros(6, 2, dtype=torch.long), index, torch.float32)
    repeated = {k: v for k, v in shared.items() if k not in ("image_index", "video_index")}
    repeated.update(_media(items, index.tolist(), torch.float32))
    for name, inputs in (("shared", shared), ("repeated", repeated)):
        model.zero_grad()
        logits = model(inputs["input_ids"], inputs["position_ids"], document_ids=inputs["document_ids"],
                       **{k: v for k, v in inputs.items() if k not in ("input_ids", "position_ids", "document_ids")})
        logits.float().square().mean().backward()
        out[f"media_{name}"] = (logits.detach(), model.vision.patch_embed.weight.grad.clone(),
                                inputs["pixel_values"].shape[0], inputs["pixel_values_videos"].shape[0])

    # Held-out evaluation (pretrain.evaluate): all prompts in one batch, each prompt's media through the
    # ViT once for all its answer choices; the same scores and greedy answers as each prompt alone.
    from pretrain.data.encoding import EncodingConfig, SampleEncoder
    from pretrain.generate import InferenceModel, choice_log_likelihoods, generate_answers

    model.eval()
    im = InferenceModel(model, tokenizer, SampleEncoder(tokenizer, EncodingConfig()), None, None)
    patches = []  # the patches each ViT pass encodes
    hook = model.vision.register_forward_hook(lambda module, args, result: patches.append(args[0].shape[0]))
    choices = [["red", "blue square"], ["red", "blue square", "left", "it moves up"], ["up"],
               ["it moves up", "left", "down"]]
    together = choice_log_likelihoods(im, prompts, choices)
    encoded = sum(patches)
    alone = [[choice_log_likelihoods(im, [p], [[c]])[0][0] for c in options] for p, options in zip(prompts, choices)]
    out["choices"] = (together, alone, encoded,
                      prompts[1]["pixel_values"].shape[0] + prompts[3]["pixel_values_videos"].shape[0])
    out["answers"] = (generate_answers(im, prompts, max_new_tokens=NEW),
                      [generate_answers(im, [p], max_new_tokens=NEW)[0] for p in prompts])
    hook.remove()
    return out


def _multi(rank, cfg, tokenizer, prompts, ckpt, stop_token):
    from megatron.core import parallel_state as ps

    from pretrain.posttrain.rollout import generate_rollouts, sequence_logprobs

    out = {}
    greedy = RolloutConfig(temperature=0, max_new_tokens=NEW, group_size=G, stop_tokens=())
    sampled = RolloutConfig(temperature=1.0, max_new_tokens=NEW, group_size=G, seed=1)

    model = _build(cfg, {"tp": 2, "sequence_parallel": True}, ckpt)
    out["tp2_greedy"] = generate_rollouts(model, prompts, greedy, tokenizer)
    out["tp2_sampled"] = generate_rollouts(model, prompts, sampled, tokenizer, step=3)
    out["tp2_sp_restored"] = model.config.sequence_parallel and model.output_layer.sequence_parallel
    with torch.no_grad():
        out["tp2_logprobs"] = sequence_logprobs(model, prompts, out["tp2_sampled"])
    ps.destroy_model_parallel()

    # EP2: each rank its own prompts (rank 0 one, rank 1 three), named by their global index. The
    # stop token ends rank 0's responses early; it keeps stepping with rank 1 (MoE all-to-all).
    model = _build(cfg, {"ep": 2}, ckpt)
    mine = [0] if rank == 0 else [1, 2, 3]
    stopping = dataclasses.replace(greedy, stop_tokens=(tokenizer.id_to_token(stop_token),))
    out["ep2_stopped"] = generate_rollouts(model, [prompts[i] for i in mine], stopping, tokenizer, prompt_keys=mine)
    out["ep2_sampled"] = generate_rollouts(model, [prompts[i] for i in mine], sampled, tokenizer, step=3,
                                           prompt_keys=mine)
    ps.destroy_model_parallel()

    # PP2: the stages pass the hidden states on (DeepStack features too, in the prefill of the image
    # and video prompts), the last one samples.
    model = _build(cfg, {"pp": 2}, ckpt)
    out["pp2_sampled"] = generate_rollouts(model, prompts, sampled, tokenizer, step=3)
    out["pp2_stopped"] = generate_rollouts(model, prompts, stopping, tokenizer)
    with torch.no_grad():
        out["pp2_logprobs"] = sequence_logprobs(model, prompts, out["pp2_sampled"])
        out["pp2_with_entropy"] = sequence_logprobs(model, prompts, out["pp2_sampled"], with_entropy=True)
    try:
        sequence_logprobs(model, prompts, out["pp2_sampled"])
    except ValueError as exc:
        out["pp2_grad_error"] = str(exc)
    return out


# ----------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    cfg = _model_config(tokenizer)
    prompts = _prompts(tokenizer)
    ckpt = str(tmp_path_factory.mktemp("rollout") / "weights")
    return cfg, prompts, ckpt


@pytest.fixture(scope="module")
def single(setup, tokenizer):
    cfg, prompts, ckpt = setup
    return run_ranks(_single, 1, cfg, tokenizer, prompts, ckpt)[0]


def _same_responses(a, b):
    assert torch.equal(a.response_ids, b.response_ids), f"{a.response_ids}\n!=\n{b.response_ids}"
    assert torch.equal(a.response_mask, b.response_mask)
    assert (a.logprobs - b.logprobs).abs().max().item() <= TOL


def test_greedy_with_the_cache_equals_full_recomputation(single):
    cache, full = single["greedy"], single["greedy_recompute"]
    assert cache.response_ids.shape == (4 * G, NEW)
    assert bool(cache.response_mask.all())  # no stop token: every response runs to max_new_tokens
    _same_responses(cache, full)
    # G greedy responses of one prompt are the same; different prompts answer differently.
    assert torch.equal(cache.response_ids[0], cache.response_ids[1])
    assert not torch.equal(cache.response_ids[0], cache.response_ids[2 * G])
    assert cache.timing["forwards"] == NEW and full.timing["forwards"] == NEW
    assert single["training_after"]  # the model is back in training mode


def test_sampling_is_reproducible_from_seed_and_step(single):
    a = single["sampled"]
    _same_responses(a, single["sampled_again"])
    _same_responses(a, single["sampled_recompute"])
    for other in ("sampled_seed2", "sampled_step4"):
        assert not torch.equal(a.response_ids, single[other].response_ids), other
    # The G responses of a prompt differ (independent streams)...
    assert not torch.equal(a.response_ids[0], a.response_ids[1])
    # ...and a prompt's stream depends on its key, not on its place in the batch.
    rev = single["sampled_reversed"]
    order = torch.arange(4).flip(0).repeat_interleave(G) * G + torch.arange(G).repeat(4)
    width = a.response_ids.shape[1]
    assert torch.equal(rev.response_ids[order, :width], a.response_ids)
    assert [rev.texts[i] for i in order.tolist()] == a.texts


def test_top_p_tiny_is_greedy(single):
    assert torch.equal(single["top_p_tiny"].response_ids, single["greedy"].response_ids)


def test_generation_logprobs_equal_sequence_logprobs(single):
    for name in ("sampled", "warm", "greedy"):
        rollouts, logp = single[name], single[f"logprobs{'' if name == 'sampled' else '_' + name}"]
        assert rollouts.temperature == {"sampled": 1.0, "warm": 0.7, "greedy": 1.0}[name]
        diff = (logp - rollouts.logprobs).abs().max().item()
        assert diff <= TOL, f"{name}: max |logp diff| {diff:.2e}"
        assert bool((rollouts.logprobs[rollouts.response_mask] < 0).all())
        assert bool((logp[~rollouts.response_mask] == 0).all())
    assert single["grad_norm"] > 0
    # Tokens beyond the tokenizer's vocabulary (the padded embedding rows) are never sampled.
    assert int(single["warm"].response_ids.max()) < single["warm"].vocab_size


def test_image_prompt_reaches_the_model(single):
    rows = slice(G, 2 * G)
    same = single["logprobs"][rows]
    other = single["logprobs_other_image"]
    assert (same - other).abs().max().item() > 1e-3


def test_stop_tokens_end_responses_and_the_mask(single, tokenizer):
    stop_id, stop_at = single["stop"]
    stopped, reference = single["stopped"], single["greedy"]
    _same_responses(stopped, single["stopped_recompute"])
    for i in range(stopped.response_ids.shape[0]):
        full = reference.response_ids[i].tolist()
        length = full.index(stop_id) + 1 if stop_id in full else NEW
        assert int(stopped.lengths[i]) == length
        assert bool(stopped.finished[i]) == (stop_id in full)
        assert stopped.response_mask[i].tolist() == [t < length for t in range(stopped.response_ids.shape[1])]
        assert stopped.response_ids[i, :length].tolist() == full[:length]
    assert int(stopped.lengths[0]) == stop_at + 1
    assert stopped.texts[0] == tokenizer.decode(reference.response_ids[0, :stop_at + 1].tolist())
    assert RolloutConfig().stop_tokens == ("<|im_end|>", "<|endoftext|>")


def test_texts_keep_special_tokens(single, tokenizer):
    """Texts are decoded with their special tokens (the format reward looks for <|im_end|>)."""
    specials = set(tokenizer.special_token_ids.values())
    seen = 0
    for rollouts in (single["sampled"], single["warm"]):
        for i, text in enumerate(rollouts.texts):
            ids = rollouts.response_ids[i, :int(rollouts.lengths[i])].tolist()
            assert text == tokenizer.decode(ids)
            assert bool(rollouts.finished[i]) == (ids[-1] in (tokenizer.im_end_id, tokenizer.eos_id))
            for token in specials.intersection(ids):
                assert tokenizer.id_to_token(token) in text
                seen += 1
    assert seen > 0  # the random model samples some special tokens


def test_other_attention_backends_generate_alike(single):
    _same_responses(single["dense_mask"], single["greedy"])
    assert single["dense_mask_restored"] == ("dense_mask", "DotProductAttention")


@pytest.fixture(scope="module")
def multi(setup, tokenizer, single):
    cfg, prompts, ckpt = setup
    return run_ranks(_multi, 2, cfg, tokenizer, prompts, ckpt, single["stop"][0], timeout=300)


def test_tp2_with_sequence_parallelism_samples_what_one_rank_samples(multi, single):
    for rank in (0, 1):
        got = multi[rank]
        _same_responses(got["tp2_greedy"], single["greedy"])
        _same_responses(got["tp2_sampled"], single["sampled"])
        assert (got["tp2_logprobs"] - single["logprobs"]).abs().max().item() <= TOL
        assert got["tp2_sp_restored"]  # sequence parallelism is back on after the rollout
    assert multi[0]["tp2_sampled"].texts == multi[1]["tp2_sampled"].texts


def test_ep2_ranks_with_different_prompts_sample_what_one_rank_samples(multi, single):
    # Rank 0 holds prompt 0, rank 1 prompts 1..3 (named by their global index).
    for key, reference in (("ep2_stopped", single["stopped"]), ("ep2_sampled", single["sampled"])):
        for rank, rows in ((0, slice(0, G)), (1, slice(G, 4 * G))):
            got = multi[rank][key]
            width = got.response_ids.shape[1]
            assert torch.equal(got.response_ids, reference.response_ids[rows, :width]), (key, rank)
            assert torch.equal(got.lengths, reference.lengths[rows])
            assert (got.logprobs - reference.logprobs[rows, :width]).abs().max().item() <= TOL
    # Rank 0's responses ended early; it stepped along with rank 1 (the MoE all-to-all needs both).
    assert int(multi[0]["ep2_stopped"].lengths.max()) < NEW
    assert multi[0]["ep2_stopped"].timing["forwards"] == multi[1]["ep2_stopped"].timing["forwards"] == NEW


def test_pp2_samples_what_one_rank_samples(multi, single):
    for rank in (0, 1):  # both pipeline stages return the rollouts
        got = multi[rank]
        _same_responses(got["pp2_sampled"], single["sampled"])
        _same_responses(got["pp2_stopped"], single["stopped"])
        assert (got["pp2_logprobs"] - single["logprobs"]).abs().max().item() <= TOL
        # Both come from the last stage, each in its place (the RL stage logs rank 0's entropy).
        logp, entropy = got["pp2_with_entropy"]
        assert (logp - single["logprobs"]).abs().max().item() <= TOL
        assert (entropy - single["entropy"]).abs().max().item() <= TOL
        assert "runs without gradients" in got["pp2_grad_error"]


@pytest.mark.parametrize("options, message", [
    ({"group_size": 0}, "group_size G=0 must be an integer >= 1"),
    ({"temperature": -0.1}, "temperature=-0.1 must be a finite number >= 0"),
    ({"top_p": 0.0}, "top_p=0.0 must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p=1.5 must be in \\(0, 1\\]"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be an integer >= 1"),
])
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as info:
        RolloutConfig(**options)
    assert "\n" not in str(info.value)


def test_sampling_rule():
    """Inverse-CDF draws: u picks the token whose cumulative probability interval holds it; top-p
    keeps the smallest set of most likely tokens reaching p and renormalises it."""
    from pretrain.posttrain.rollout import sample_tokens

    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    logits = probs.log()
    # Sorted: token 1 (0.5), token 2 (0.3), token 0 (0.1), token 3 (0.1): intervals [0, .5), [.5, .8), ...
    for u, token in ((0.0, 1), (0.49, 1), (0.51, 2), (0.79, 2), (0.81, 0), (0.95, 3)):
        got, logp = sample_tokens(logits, torch.tensor([u], dtype=torch.float64), 1.0, 1.0)
        assert int(got) == token and abs(float(logp) - float(probs[0, token].log())) < 1e-6
    # top-p 0.7 keeps tokens 1 and 2 (0.5 < 0.7 <= 0.8), renormalised to 5/8 and 3/8.
    for u, token in ((0.6, 1), (0.63, 2), (0.99, 2)):
        got, logp = sample_tokens(logits, torch.tensor([u], dtype=torch.float64), 1.0, 0.7)
        assert int(got) == token
        assert abs(float(logp) - float(probs[0, token].log())) < 1e-6  # the untruncated policy's log-prob


def test_rows_of_one_prompt_share_its_vit_pass(single):
    logits, grad, image_patches, video_patches = single["media_shared"]
    want_logits, want_grad, repeated_image_patches, repeated_video_patches = single["media_repeated"]
    assert image_patches * 2 == repeated_image_patches and video_patches * 3 == repeated_video_patches
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_answer_choices_share_the_prompts_vit_pass(single):
    together, alone, encoded, patches = single["choices"]
    assert encoded == patches  # one ViT pass over each prompt's media, not one per choice
    assert [len(x) for x in together] == [2, 4, 1, 3]
    for batched, single_scores in zip(together, alone):
        assert max(abs(a - b) for a, b in zip(batched, single_scores)) <= 1e-4, (together, alone)
    assert len(set(round(x, 3) for x in together[1])) == 4  # the choices score differently


def test_batched_greedy_answers_equal_each_prompt_alone(single):
    batched, alone = single["answers"]
    assert batched == alone
    assert any(batched)  # (random weights still write something)


def test_response_rows_are_packed_one_document_each():
    """Rows of different prompt and response lengths follow each other in one sequence, each its own
    document, padding only at the end; ``index`` points at the logit that predicts each response token."""
    from pretrain.posttrain.rollout import packed_length, response_rows

    prompts = [{"input_ids": torch.arange(10, 15)}, {"input_ids": torch.arange(20, 23)}]  # 5 and 3 tokens
    responses = torch.tensor([[7, 8, 9], [4, 5, 6], [1, 2, 3]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    prompt_index = torch.tensor([0, 1, 0])
    inputs, index = response_rows(prompts, responses, prompt_index, torch.float32, response_mask=mask, multiple_of=4)
    sizes = [5 + 3, 3 + 1, 5 + 0]  # a row ends at its last token in the mask
    assert packed_length(prompts, prompt_index, responses, mask, multiple_of=4) == 20  # 17 rounded up
    ids, documents, positions = inputs["input_ids"][0], inputs["document_ids"][0], inputs["position_ids"][:, 0]
    assert ids.shape == (20,) and positions.shape == (3, 20)
    # the tail is a document of its own, id -1 as a pack's padding (left out of the MoE routers)
    assert documents.tolist() == [0] * 8 + [1] * 4 + [2] * 5 + [-1] * 3
    assert ids[:17].tolist() == [10, 11, 12, 13, 14, 7, 8, 9, 20, 21, 22, 4, 10, 11, 12, 13, 14]
    assert positions[0, :17].tolist() == [*range(8), *range(4), *range(5)]  # each row from 0
    offsets = [0, 8, 12]
    for i, (start, size) in enumerate(zip((5, 3, 5), sizes)):
        kept = size - start
        for t in range(3):
            if t < kept:  # the logit before token t of the response predicts it
                assert int(index[i, t]) == offsets[i] + start - 1 + t and ids[index[i, t] + 1] == responses[i, t]
            else:  # past the row's end: its last token (masked by the caller), never another row's
                assert offsets[i] <= int(index[i, t]) < offsets[i] + size
    with pytest.raises(ValueError, match="packed length 16 must be >= 20"):
        response_rows(prompts, responses, prompt_index, torch.float32, response_mask=mask, multiple_of=4, length=16)


def test_response_tokens_take_the_positions_of_text_after_their_prompt(tokenizer):
    """A response token is text that follows its prompt: in the rollout's grid and in the update's packed
    rows it has the position that token would have in the prompt + response as one sample
    (``mrope_position_ids``, which follows transformers' ``get_rope_index``). After an image or a video
    that is the prompt's largest position + 1, not its length: a rule shared by the rollout and the
    update but off there would pass every log-prob comparison between the two."""
    from common.tokens.positions import IMAGE, TEXT, VIDEO, mrope_position_ids
    from pretrain.posttrain.rollout import _Batch, _prompts as parsed, response_rows

    prompts = parsed(_prompts(tokenizer))
    assert any(p.media for p in prompts)  # an image and a video prompt: positions are not arange there
    k = 4
    types = {tokenizer.image_pad_id: IMAGE, tokenizer.video_pad_id: VIDEO}
    expected = []
    for p in prompts:
        prompt_types = [types.get(int(t), TEXT) for t in p.ids]
        full = mrope_position_ids(torch.tensor(prompt_types + [TEXT] * k), p.media.get("image_grid_thw"),
                                  p.media.get("video_grid_thw"))
        assert torch.equal(full[:, :p.ids.numel()], p.positions)
        expected.append(full[:, p.ids.numel():])
    assert any(int(e[0, 0]) != p.ids.numel() for e, p in zip(expected, prompts))  # not vacuous

    grid = _Batch.build(prompts, 1, k, tokenizer.pad_id)
    for i, want in enumerate(expected):
        assert torch.equal(grid.positions[:, i, grid.prompt_len:], want), i

    responses = torch.randint(10, 100, (len(prompts), k))
    inputs, _ = response_rows(prompts, responses, torch.arange(len(prompts)), torch.float32)
    positions, offset = inputs["position_ids"][:, 0], 0
    for p, want in zip(prompts, expected):
        start = offset + p.ids.numel()
        assert torch.equal(positions[:, start:start + k], want)
        offset = start + k


def _response_logprobs_rank(rank, logits, index, responses, mask, vocab, banned):
    from common.distributed.parallel import initialize_distributed
    from pretrain.posttrain.rollout import response_logprobs

    initialize_distributed({"tp": 2})
    shard = logits.shape[-1] // 2
    mine = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
    logp = response_logprobs(mine, index, responses, mask, 0.7, vocab, banned)
    logp.sum().backward()
    return logp.detach(), mine.grad


def test_response_logprobs_score_the_kept_tokens_over_the_vocabulary_shards():
    """Two tensor-parallel ranks, each with half the vocabulary: the log-probs of the tokens in the mask
    are log_softmax over the tokenizer's vocabulary less the banned ids (at the temperature), 0 past each
    row's end, and the gradient reaches only the logits that predict kept tokens."""
    torch.manual_seed(0)
    vocab, padded, banned = 27, 32, (3, 20)  # the model's vocabulary padded past the tokenizer's
    logits = torch.randn(1, 12, padded)
    index = torch.tensor([[1, 2, 3, 3], [6, 7, 7, 7], [9, 10, 11, 11]])
    responses = torch.tensor([[5, 0, 26, 9], [1, 2, 3, 4], [7, 8, 19, 1]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, False]])
    results = run_ranks(_response_logprobs_rank, 2, logits, index, responses, mask, vocab, banned)
    z = logits[0, :, :vocab] / 0.7
    z[:, list(banned)] = float("-inf")
    expected = torch.where(mask, torch.log_softmax(z, dim=-1)[index, responses], 0.0)
    for logp, _ in results:
        assert logp.shape == (3, 4)
        torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)
    grad = torch.cat([g for _, g in results], dim=-1)[0]
    predicting = sorted(set(index[mask].tolist()))
    assert grad[predicting].abs().sum(dim=-1).gt(0).all()
    others = [p for p in range(12) if p not in predicting]
    assert grad[others].abs().max().item() == 0
