"""``python -m pretrain.train stage=... model=... data=... parallel=... [overrides] [--cfg job]``.

One stage of Qwen3-VL training (see ``pretrain/trainer.py``). Start it on every rank: ``torchrun
--nproc-per-node N -m pretrain.train ...`` on one machine, or through ``python -m slurm.submit`` on a
cluster. ``--cfg job`` prints the resolved config and exits; a bad config is a one-line error (exit 2).
Exit status: 0 when the stage finished or was requeued after a signal, 1 on an error, 3 when a
signal stopped it (checkpoint saved) and no requeue will restart it.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

EXIT_STOPPED_EARLY = 3  # stopped by a signal, checkpoint saved, not requeued


def main(argv: list[str] | None = None) -> int:
    from pretrain.cli import job_from_argv

    _, cfg, job = job_from_argv(sys.argv[1:] if argv is None else argv, "python -m pretrain.train",
                                "Train one stage of a Qwen3-VL model.")
    from model.config import ConfigError as ModelConfigError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.data.blend import BlendError
    from pretrain.data.encoding import SampleEncodingError
    from common.distributed.parallel import ParallelConfigError, destroy_distributed
    from pretrain.posttrain.on_policy_distill import run_on_policy_distill_stage
    from pretrain.posttrain.rl_stage import RLSetupError, run_rl_stage
    from pretrain.trainer import TrainingStopped, run_stage

    run = {"rl": run_rl_stage, "distill_on_policy": run_on_policy_distill_stage}.get(job.stage.kind, run_stage)
    try:
        result = run(job, OmegaConf.to_yaml(cfg, resolve=True))
    except (ParallelConfigError, CheckpointError, TrainingStopped, ModelConfigError, RLSetupError, ConfigError,
            BlendError, SampleEncodingError) as exc:  # what a job's settings or files can get wrong: one line
        # (SampleEncodingError: no prompt of the RL set can be encoded; a bad one alone is skipped, as training
        # data skips such samples)
        from pretrain.metrics import close_progress_bars

        close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    if result.preempted and not result.requeued:
        # Saved, but nobody restarts it: the stage is unfinished, which a job chain must see.
        print(f"stage {result.stage} stopped at step {result.start_step + result.steps} of {result.total_steps} "
              f"(checkpoint saved, not requeued); rerun the same command to resume from {result.checkpoint}",
              file=sys.stderr)
        return EXIT_STOPPED_EARLY
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
