"""The KV cache of a generation: each prompt's keys and values once, each row's response after them.

A generation (:mod:`pretrain.posttrain.rollout`) answers P prompts with G responses each; batch row
``r`` answers prompt ``r // G``. The model (:class:`model.qwen3vl.Qwen3VLModel`, ``kv_cache=``) hands this
cache to its decoder layers' :class:`model.attention.DocumentAttention` for the length of a forward.

* **Prefill** (``decoding`` False): the P prompts packed into one row, ``[1, L]`` (their unpadded tokens
  back to back, in order; ``padding`` ``[P, S]`` describes them left-padded to the longest, of S tokens:
  True at a shorter prompt's padding). Every layer stores its keys and values as they come,
  ``[L, hk, d]`` (after the rotary embedding), and attends as it would without a cache; the model keeps
  each prompt's last token (:meth:`last_tokens`).
* **Decoding** (after :meth:`start_decoding`): one new token for each held row (``rows``, batch rows in
  cache order). A layer writes the token's key and value at response column ``length`` of its buffers
  ``[rows, hk, max_new_tokens, d]`` (allocated at the first step, in the keys' dtype and on their device)
  and attends to its prompt's keys and to its response so far, one softmax over both; the caller calls
  :meth:`advance` after the step.

The G rows of a prompt share its keys and values: L + B x max_new_tokens positions, where a cache of
whole left-padded rows holds B x (S + max_new_tokens), and one of left-padded prompts P x S + B x
max_new_tokens (with a video prompt among text prompts, P x S is several times L). Only a decoding step
lays one layer's prompts out left-padded, for its batched matmuls, in the fp32 copy that its attention
computes in anyway. Keys are stored rotated, so a decoding step rotates its new
token only (Megatron-Core's static inference cache keeps keys unrotated and applies the rotary embedding
again to all of a layer's cached keys at every step), and the caller passes the new tokens' positions only.
Finished rows are dropped with :meth:`keep_rows` (a copy of every layer's buffers: the caller does it when
few enough rows still run, not for every finished row).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of a generation's P prompts (once each) and of the responses of the P * G rows
    that answer them; see the module docstring. ``padding`` bool ``[P, S]`` (the prompts left-padded to the
    longest: True at the padding), ``group_size`` G, ``max_new_tokens`` the response columns."""

    def __init__(self, padding: torch.Tensor, group_size: int, max_new_tokens: int):
        self.padding, self.group_size, self.max_new_tokens = padding, group_size, max_new_tokens
        self.rows = torch.arange(padding.shape[0] * group_size, device=padding.device)
        self.lengths = (~padding).sum(dim=1)  # tokens of each prompt
        self.tokens = int(self.lengths.sum())  # L, the prompts' tokens
        # left-padded slot j of [P * S] -> the packed token it holds (padding: token 0, which no query sees)
        self._slots = torch.zeros(padding.numel(), dtype=torch.long, device=padding.device)
        self._slots[(~padding).flatten()] = torch.arange(self.tokens, device=padding.device)
        self.prompt_keys: dict[int, torch.Tensor] = {}  # per layer number: [L, hk, d]
        self.prompt_values: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}  # per layer number: [rows, hk, max_new_tokens, d]
        self.values: dict[int, torch.Tensor] = {}
        self.decoding = False
        self.length = 0  # response tokens cached (the column the next decoding step writes)

    def store_prompts(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """The prefill's keys and values of decoder layer ``layer``: ``[L, 1, hk, d]``, the prompts packed."""
        if self.decoding:
            raise RuntimeError("the prompts' keys and values are stored in the prefill, before decoding")
        if key.shape[:2] != (self.tokens, 1):
            raise ValueError(f"the prefill packs the {self.padding.shape[0]} prompts' {self.tokens} tokens into "
                             f"one row: got keys {tuple(key.shape)}")
        # Copies: the attention's value (and key) may be a view of its fused qkv projection, which it would
        # keep alive.
        self.prompt_keys[layer] = key[:, 0].clone(memory_format=torch.contiguous_format)
        self.prompt_values[layer] = value[:, 0].clone(memory_format=torch.contiguous_format)

    def last_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states whose logits the step needs, ``[1, b, h]`` from ``[s, b, h]``: in the prefill
        each prompt's last token (``b`` = P), in a decoding step the new token of each row."""
        if self.decoding:
            return hidden[-1:]
        return hidden[(self.lengths.cumsum(0) - 1).to(hidden.device), 0][None]

    def start_decoding(self) -> None:
        """The prefill is done: forwards from here on feed one token per held row."""
        self.decoding = True

    def advance(self) -> None:
        """A decoding step is done (every layer wrote its column)."""
        self.length += 1

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep the held rows at positions ``index`` (int64, cache order) and drop the others."""
        index = index.to(self.rows.device)
        self.rows = self.rows[index]
        for buffers in (self.keys, self.values):
            for layer, buffer in buffers.items():
                buffers[layer] = buffer.index_select(0, index.to(buffer.device))

    def release(self) -> None:
        """Free every buffer (the generation is over)."""
        for buffers in (self.prompt_keys, self.prompt_values, self.keys, self.values):
            buffers.clear()

    def _buffers(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (self.rows.numel(), key.shape[2], self.max_new_tokens, key.shape[3])
            self.keys[layer] = key.new_empty(shape)
            self.values[layer] = key.new_empty(shape)
        return self.keys[layer], self.values[layer]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """One decoding step of decoder layer ``layer``: ``query [1, b, hq, d]``, ``key/value [1, b, hk, d]``
        of the held rows' new tokens (rotated) -> ``[1, b, hq * d]``: each row attends to its prompt's
        unpadded keys and to its response's, the new token's included, one softmax (``scale``: the
        softmax scale)."""
        sq, b, hq, d = query.shape
        if sq != 1 or b != self.rows.numel() or key.shape[0] != 1:
            raise ValueError(f"a decoding step feeds one token for each of the {self.rows.numel()} held rows: "
                             f"got {sq} queries and {key.shape[0]} keys for {b} rows")
        t = self.length
        if t >= self.max_new_tokens:
            raise ValueError(f"the KV cache holds {self.max_new_tokens} response tokens per row, all written")
        keys, values = self._buffers(layer, key)
        keys[:, :, t], values[:, :, t] = key[0], value[0]
        prompts, s = self.padding.shape
        hk = key.shape[2]
        g, rep = self.group_size, hq // hk
        slots = self._slots.to(key.device)

        def left_padded(x):  # the prompts' [L, hk, d] -> [P, hk, S, d] in float32
            grid = torch.empty((prompts, hk, s, d), dtype=torch.float32, device=x.device)
            return grid.copy_(x.index_select(0, slots).view(prompts, s, hk, d).transpose(1, 2))

        rows = self.rows
        q = query[0].reshape(b, hk, rep, d)  # query head j uses key head j // rep (grouped-query attention)

        def to_prompts(x):  # [b, hk, rep, n] rows -> [P, hk, G * rep, n], absent rows 0
            grid = x.new_zeros(prompts * g, *x.shape[1:])
            grid[rows] = x
            return grid.view(prompts, g, hk, rep, -1).transpose(1, 2).reshape(prompts, hk, g * rep, -1)

        def to_rows(x):  # [P, hk, G * rep, n] -> [b, hk, rep, n]
            return x.view(prompts, hk, g, rep, -1).transpose(1, 2).reshape(prompts * g, hk, rep, -1)[rows]

        # In float32 throughout (scores rounded to bf16, or probabilities, would make the rollouts' log-probs
        # coarser than the training forward's, whose kernels accumulate in fp32: a rollout-vs-train gap;
        # measured on CPU in bf16, mean |sampled - scored log-prob| 3.7e-4 so, 5.5e-4 with bf16 probabilities).
        # The prompt is read once for its G rows: they are extra query heads of one matmul per prompt.
        q = q.float()
        response_keys, response_values = keys[:, :, :t + 1].float(), values[:, :, :t + 1].float()
        prompt_keys = left_padded(self.prompt_keys[layer])
        scores = torch.cat([to_rows(torch.matmul(to_prompts(q), prompt_keys.transpose(-1, -2))),
                            torch.matmul(q, response_keys.transpose(-1, -2))], dim=-1) * scale
        del prompt_keys  # before the values' copy
        hidden = self.padding[rows // g]  # [b, s]
        scores[..., :s] = scores[..., :s].masked_fill(hidden[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = to_rows(torch.matmul(to_prompts(probs[..., :s]), left_padded(self.prompt_values[layer])))
        out = out + torch.matmul(probs[..., s:], response_values)
        return out.to(query.dtype).reshape(1, b, hq * d)
