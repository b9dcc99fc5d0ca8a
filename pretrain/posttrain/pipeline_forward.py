"""One forward of a frozen model through the pipeline stages, outside Megatron's schedules.

Rollouts (:mod:`.rollout`: prefill, decoding steps, reference log-probs) and the distillation teacher
(:mod:`.distill_stage`) run forwards without gradient that Megatron's pipeline schedules do not
drive. Each pipeline rank calls :func:`stage_forward` with its own stage of the model, in the same
order on every rank: the hidden states go down the stages point-to-point (``torch.distributed`` send
and recv on the default group; Megatron's schedules use their own pipeline group, so the two never
match each other's messages). Without pipeline parallelism both functions are plain calls.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def stage_forward(model, run: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """This pipeline stage's part of one forward: the previous stage's hidden states in (their shape
    first: it changes between forwards, e.g. a prefill that carries DeepStack features and the decoding
    steps, or micro-batches with and without images), ``run()``, its output out to the next stage.

    ``model``: this rank's stage, a module with ``pre_process`` / ``post_process`` and
    ``set_input_tensor`` (e.g. :class:`model.qwen3vl.Qwen3VLModel`); what crosses stages is cast to its
    parameters' dtype. Returns the output of ``run()`` on the last stage, None on the others. Without
    pipeline parallelism, just ``run()``.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return run()
    param = next(model.parameters())
    if not model.pre_process:
        prev = parallel_state.get_pipeline_model_parallel_prev_rank()
        shape = torch.empty(3, dtype=torch.long, device=param.device)
        dist.recv(shape, src=prev)
        hidden = torch.empty(*shape.tolist(), dtype=param.dtype, device=param.device)
        dist.recv(hidden, src=prev)
        model.set_input_tensor(hidden)
    out = run()
    if model.post_process:
        return out
    following = parallel_state.get_pipeline_model_parallel_next_rank()
    dist.send(torch.tensor(out.shape, dtype=torch.long, device=param.device), dst=following)
    dist.send(out.to(param.dtype).contiguous(), dst=following)
    return None


def from_last_stage(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """``t`` of the last pipeline stage on every stage (the others pass None; a no-op without
    pipeline parallelism)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    if t is None:
        t = torch.empty(shape, dtype=dtype, device=device)
    t = t.contiguous()
    dist.broadcast(t, parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return t
