"""model.kv_cache.KVCache: a decoding step's attention over the shared prompt and the row's own response
equals plain attention over the row's whole sequence (the model-level check, cache = recomputation, is
tests/posttrain/test_rollout.py)."""

import pytest
import torch

from model.kv_cache import KVCache


def _reference(query, keys, values, scale):
    """One query per row ``[b, hq, d]`` over that row's own ``keys/values [b, n, hk, d]`` (grouped heads)."""
    rep = query.shape[1] // keys.shape[2]
    k, v = (x.repeat_interleave(rep, dim=2).transpose(1, 2) for x in (keys, values))  # [b, hq, n, d]
    probs = torch.softmax(torch.einsum("bhd,bhnd->bhn", query, k) * scale, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", probs, v)


def test_decoding_attends_to_the_unpadded_prompt_and_the_rows_response():
    torch.manual_seed(0)
    prompts, g, s, new, hq, hk, d, layer = 3, 2, 7, 4, 4, 2, 8, 5
    lengths = [7, 3, 5]  # left-padded to 7
    padding = torch.tensor([[i < s - n for i in range(s)] for n in lengths])
    cache = KVCache(padding, g, new)
    prompt_k, prompt_v = torch.randn(s, prompts, hk, d), torch.randn(s, prompts, hk, d)  # left-padded

    def packed(x):  # the prefill's layout: the prompts' tokens back to back in one row
        return torch.cat([x[s - n:, p] for p, n in enumerate(lengths)])[:, None]

    cache.store_prompts(layer, packed(prompt_k), packed(prompt_v))
    hidden = packed(torch.randn(s, prompts, 16))
    torch.testing.assert_close(cache.last_tokens(hidden)[0], hidden[[6, 9, 14], 0])  # each prompt's last token
    cache.start_decoding()
    rows = torch.arange(prompts * g)
    response_k, response_v = torch.randn(prompts * g, new, hk, d), torch.randn(prompts * g, new, hk, d)
    scale = d ** -0.5
    for t in range(new):
        if t == 2:  # rows 1 and 4 finished: the cache keeps the others, in order
            rows = torch.tensor([0, 2, 3, 5])
            cache.keep_rows(torch.tensor([0, 2, 3, 5]))
        query = torch.randn(1, rows.numel(), hq, d)
        out = cache.attend(layer, query, response_k[rows, t][None], response_v[rows, t][None], scale)
        cache.advance()
        for i, r in enumerate(rows.tolist()):
            p, n = r // g, lengths[r // g]
            keys = torch.cat([prompt_k[s - n:, p], response_k[r, :t + 1]])[None]
            values = torch.cat([prompt_v[s - n:, p], response_v[r, :t + 1]])[None]
            expected = _reference(query[0, i][None], keys, values, scale)
            torch.testing.assert_close(out[0, i].view(hq, d), expected[0], rtol=1e-5, atol=1e-6)


def test_prompts_are_held_unpadded_apart_from_the_attentions_fused_projection():
    """A 2-token and a 9-token prompt: 11 positions per layer (left-padded: 18), in tensors of their own
    (the attention's keys and values are views of its fused qkv output, 3x their size here)."""
    lengths, hk, d = (2, 9), 2, 4
    padding = torch.tensor([[i < 9 - n for i in range(9)] for n in lengths])
    cache = KVCache(padding, group_size=4, max_new_tokens=3)
    qkv = torch.randn(11, 1, 3 * hk, d)  # [L, 1, q | k | v heads, d]
    cache.store_prompts(0, qkv[:, :, hk:2 * hk], qkv[:, :, 2 * hk:])
    for stored in (cache.prompt_keys[0], cache.prompt_values[0]):
        assert stored.shape == (11, hk, d)
        assert stored.untyped_storage().nbytes() == 11 * hk * d * 4


def test_the_cache_refuses_wrong_shapes_and_an_overfull_cache():
    cache = KVCache(torch.zeros(1, 3, dtype=torch.bool), 2, 1)
    with pytest.raises(ValueError, match="packs the 1 prompts' 3 tokens into one row"):
        cache.store_prompts(0, torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    cache.store_prompts(0, torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4))
    cache.start_decoding()
    with pytest.raises(ValueError, match="one token for each of the 2 held rows"):
        cache.attend(0, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), 0.5)
    cache.attend(0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0.5)
    cache.advance()
    with pytest.raises(ValueError, match="holds 1 response tokens per row, all written"):
        cache.attend(0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0.5)
    with pytest.raises(RuntimeError, match="stored in the prefill"):
        cache.store_prompts(0, torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4))
