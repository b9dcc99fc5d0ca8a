"""``python -m slurm.submit stage=... model=... parallel=... cluster=<name> [overrides] [--dry-run]``.

Renders the sbatch script of a training stage from the Hydra config (``conf/cluster/<name>.yaml``
for the cluster) and submits it with ``sbatch``; ``--dry-run`` prints the script instead. With
``--chain s0_align,s1_pretrain,...`` it submits one job per stage, each depending on the previous one
(``afterok``) and starting from its final checkpoint (see :mod:`slurm.chain`). With ``--sweep
key=v1,v2 ...`` it submits one independent job per combination of the swept values, each in its own
run folder (see :mod:`slurm.sweep`), and prints a table of the job ids and their overrides.

Everything is validated before the first ``sbatch``: the config (as ``python -m pretrain.train``
would), the cluster section, the world size (nodes x tasks per node) against the parallel layout and
the global batch, and the memory per GPU: the capacity plan of each stage (``python -m pretrain.plan``)
is printed, and a stage whose plan exceeds ``cluster.gpu_memory_gb`` is refused unless ``--force``
(for a sweep: every combination, with its own plan).
A bad value is one ``config error: ...`` line (exit 2), with ``--dry-run`` too.

The script of each job is kept next to its logs, in ``cluster.output_dir`` (relative to
``--workdir``, default the current directory, which is also the job's working directory).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

from pretrain.config import ConfigError

USAGE_EPILOG = """examples:
  python -m slurm.submit stage=s1_pretrain model=qwen3vl_30b_a3b parallel=tp4_pp2_ep8 cluster=example_h100 \\
      data.max_visual_patches_per_pack=16384 --dry-run
  python -m slurm.submit --chain s0_align,s1_pretrain,s2_long_32k,s3_long_256k,sft model=qwen3vl_8b \\
      cluster=example_h100 train.run_root=/lustre/me/qwen3vl-8b parallel.tp=2 parallel.sequence_parallel=true \\
      stage.recompute.granularity=full data.max_visual_patches_per_pack=65536 s3_long_256k:cluster.nodes=32
  python -m slurm.submit stage=s1_pretrain cluster=example_h100 data.max_visual_patches_per_pack=16384 \
      --sweep stage.optimizer.lr=1e-4,3e-4 model=qwen3vl_2b,qwen3vl_4b
Overrides use Hydra's grammar (group=option, key=value); with --chain, <stage>:key=value applies to one stage.
--sweep takes the overrides after it (Hydra's sweep syntax: a,b or range(...)): one job per combination,
in <train.run_dir>/<combination>; put the fixed overrides before --sweep.
Each stage's memory plan (python -m pretrain.plan) is printed; one over cluster.gpu_memory_gb is refused."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m slurm.submit", description="Submit training stages to a SLURM cluster.",
        epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit nothing")
    parser.add_argument("--chain", metavar="S1,S2,...",
                        help="submit these stages in order, each after the previous one succeeded")
    parser.add_argument("--after", metavar="JOBID",
                        help="the (first) job starts only after job JOBID completed successfully")
    parser.add_argument("--workdir", default=".",
                        help="the job's working directory; relative paths of the config are relative to it "
                             "(default: the current directory)")
    parser.add_argument("--parsable", action="store_true",
                        help="print only the job ids, one per line (the plans go to stderr)")
    parser.add_argument("--force", action="store_true",
                        help="submit even when a stage's plan exceeds cluster.gpu_memory_gb")
    parser.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="one job per combination of these values (cartesian product), each in "
                             "<train.run_dir>/<combination>; prints a table of job ids and overrides")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, including cluster=<name>")
    return parser.parse_args(list(argv))


def _stage_jobs(args: argparse.Namespace):
    from pretrain.cli import load_job
    from slurm.chain import StageJob, chain_stage_jobs, path_override
    from slurm.sweep import sweep_combinations

    if args.sweep:
        if args.chain:
            raise ConfigError("--sweep with --chain: submit one chain per combination (set train.run_root for each)")
        jobs = []
        for combination in sweep_combinations(args.sweep, args.overrides):
            try:
                _, job = load_job([*args.overrides, *combination.overrides])
            except ConfigError as exc:
                raise ConfigError(f"sweep {combination.label}: {exc}") from None
            # Its own run folder (no other config value refers to train.run_dir: no need to compose again).
            job.train.run_dir = f"{job.train.run_dir.rstrip('/')}/{combination.label}"
            overrides = [*args.overrides, *combination.overrides, path_override("train.run_dir", job.train.run_dir)]
            jobs.append(StageJob(job.stage.name, overrides, job, label=combination.label))
        return jobs
    if args.chain:
        return chain_stage_jobs(args.chain.split(","), args.overrides)
    _, job = load_job(args.overrides)
    return [StageJob(job.stage.name, list(args.overrides), job)]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.plan import format_plan, over_memory, plan_job
    from slurm.jobs import SlurmError, sbatch_command, submit_script
    from slurm.sbatch import check_job_layout, render_sbatch_script
    from slurm.sweep import format_table

    workdir = Path(args.workdir).resolve()
    if not workdir.is_dir():
        print(f"error: --workdir {workdir}: not a directory", file=sys.stderr)
        return 2
    if args.after is not None and not args.after.isdigit():
        print(f"error: --after {args.after!r}: not a job id", file=sys.stderr)
        return 2
    # Compose, validate, plan and render every stage before submitting anything.
    plan_out = sys.stderr if args.parsable else sys.stdout
    prefix = "# " if args.dry_run else ""  # a dry run's output reads as a script
    try:
        stages = _stage_jobs(args)
        scripts = []
        for stage in stages:
            which = f"sweep {stage.label}: " if stage.label else ""
            if stage.label:
                print(f"{prefix}sweep {stage.label}: {' '.join(stage.overrides)}", file=plan_out)
            try:
                layout = check_job_layout(stage.job)
            except ConfigError as exc:
                raise ConfigError(f"{which}{exc}") from None
            plan = plan_job(stage.job, world_size=layout.world_size)
            shown = "\n".join((prefix + line).rstrip() for line in format_plan(plan).splitlines())
            print(shown, file=plan_out, flush=True)
            if plan.fits is False:
                if not args.force:
                    raise ConfigError(f"{which}{over_memory(plan)}; change the layout, stage.recompute or "
                                      "data.max_visual_patches_per_pack, or pass --force")
                print(f"warning: --force: {which}{over_memory(plan)}", file=sys.stderr)
            scripts.append((layout, render_sbatch_script(stage.job, stage.overrides, workdir=workdir, layout=layout)))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    first = stages[0].job
    if first.stage.init_from and args.after is None:
        init = Path(first.stage.init_from)
        if not (init if init.is_absolute() else workdir / init).exists():
            print(f"warning: {first.stage.name}: stage.init_from={first.stage.init_from} does not exist yet; "
                  "the job fails at start unless an earlier job writes it (use --after JOBID, or "
                  f"{'the first stage' if args.chain else 'stage'}.init_from=null)", file=sys.stderr)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    previous: str | None = args.after
    job_ids: list[str] = []
    for index, (stage, (layout, script)) in enumerate(zip(stages, scripts)):
        dependency = f"afterok:{previous}" if previous else None
        output_dir = (workdir / stage.job.cluster.output_dir).resolve()
        name = f"{stage.name}-{stage.label}" if stage.label else stage.name
        script_path = output_dir / f"{name}-{stamp}.sbatch"
        if args.dry_run:
            chained = index and not args.sweep
            shown_dep = dependency or ("afterok:<job id of " + stages[index - 1].name + ">" if chained else None)
            print(f"# ===== {name}: {layout.world_size} ranks ({layout.nodes} node(s) x "
                  f"{layout.tasks_per_node}), dp={layout.data_parallel_size}, "
                  f"{layout.micro_batches_per_step} micro-batch(es) per step")
            print("# would run: " + " ".join(sbatch_command(script_path, shown_dep)))
            print(script)
            previous = args.after if args.sweep else None
            continue
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(script_path, script)
            job_id = submit_script(script_path, dependency)
        except (OSError, SlurmError) as exc:
            print(f"error: submitting {stage.name}: {exc}", file=sys.stderr)
            if job_ids:
                print(f"already submitted: {', '.join(job_ids)} (scancel them if the chain is abandoned)",
                      file=sys.stderr)
            return 1
        job_ids.append(job_id)
        previous = args.after if args.sweep else job_id  # a sweep's jobs are independent of each other
        if args.parsable:
            print(job_id)
        else:
            after = f", after {dependency.split(':', 1)[1]}" if dependency else ""
            print(f"{name}: submitted job {job_id}{after}; {layout.world_size} ranks on {layout.nodes} "
                  f"node(s); script {script_path}; log {output_dir / f'{stage.name}-{job_id}.out'}")
    if args.sweep and not args.parsable:
        ids = job_ids or ["(dry run)"] * len(stages)
        # a sweep job's overrides: the fixed ones, its combination's, then its train.run_dir
        table = format_table([(job_id, stage.job.train.run_dir, stage.overrides[len(args.overrides):-1])
                              for job_id, stage in zip(ids, stages)])
        print(f"{prefix}sweep: {len(stages)} job(s)")
        print("\n".join(f"{prefix}{line}" for line in table.splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
