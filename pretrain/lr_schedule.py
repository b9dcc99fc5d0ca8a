"""Learning-rate schedule of a stage: linear warm-up, then cosine or WSD decay (Megatron's scheduler)."""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pretrain.config import OptimizerSchema


def build_lr_scheduler(optimizer: MegatronOptimizer, opt: OptimizerSchema, total_steps: int) -> OptimizerParamScheduler:
    """Scheduler stepped once per optimizer step over ``total_steps`` steps.

    ``cosine``: warm-up to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at the last step.
    ``wsd``: warm-up, constant ``lr`` (stable), then a cosine decay to ``min_lr`` over the last
    ``decay_fraction`` of the steps. ``constant``: warm-up then ``lr``.
    """
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[opt.schedule]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1),
        lr_decay_style=style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        # The checkpoint's schedule state wins on resume; a new stage starts its own schedule.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=max(1, round(opt.decay_fraction * total_steps)) if style == "WSD" else None,
        lr_wsd_decay_style="cosine" if style == "WSD" else None,
    )
