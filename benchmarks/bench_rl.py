"""SAPO vs GRPO vs GSPO from the same SFT checkpoint: mean reward per RL step and held-out accuracy.

    python -m benchmarks.bench_rl --demo-out DIR [--steps 30] [--eval-every 10] [--methods sapo,grpo,gspo]
        [--out bench_rl_out] [--seed 1234] [hydra overrides ...]

``DIR`` is a finished ``python -m pretrain.demo --out DIR``: its SFT checkpoint (``DIR/runs/sft/checkpoints``),
shards, tokenizer and held-out questions (``DIR/raw/eval.jsonl``). The RL prompt set ``DIR/shards/rl`` is
built from ``DIR/raw/rl.jsonl`` (``python -m data_tools build-rl``) when missing. Nothing under ``DIR/runs``
is written: the SFT checkpoint (and its run's config.yaml) is copied to ``<out>/runs/sft/``, where the
RL stages' ``init_from`` (``${train.run_root}/sft/checkpoints``) finds it.

For each method, ``torchrun -m pretrain.train stage=rl_<method>`` on 2 gloo ranks (``parallel=ep2``, the
tiny MoE, the demo's RL settings: ``pretrain.demo.STAGES``, 32 prompts x 8 responses of at most 4 tokens
per step at temperature 0.5, 2 updates per step, lr 2e-4) from that checkpoint with the same ``train.seed``, so step 1 samples the same rollouts for every method; a stage
folder left by an earlier run in ``<out>/runs`` is deleted first (a fresh run, not a resume). A checkpoint
is kept every ``--eval-every`` steps and ``pretrain.evaluate`` scores it on the held-out questions, as it
scores the SFT start (step 0): ``generated`` (the greedy answer's final answer, or its first words, is
right) and ``choice`` (the right answer is the most likely choice).

Output: every command before it runs; per method a table (step, mean reward, pass rate, held-out
accuracies at the evaluated steps); a summary line per method (reward first -> last step and mean of the
first -> second half of the steps, held-out SFT -> end, wall seconds); ``<out>/bench_rl.json`` (the
stages' per-step metrics.jsonl records, the held-out results, wall times) and ``<out>/bench_rl.png``
(mean reward per step, held-out accuracy per evaluated step; one curve per method). Per-step rewards of
64 rollouts are noisy (the steps' prompts differ; every method gets the same ones): compare trends.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from pretrain.demo import PY, STAGES, evaluate, model_overrides, run

METHODS = ("sapo", "grpo", "gspo")
# The demo's CPU-sized RL stage (about 1.3 s per step on 2 cores), its step count from --steps.
RL_OVERRIDES = ["parallel=ep2", "model=tiny_moe", "data=synth", "train.log_interval=1",
                *(o for stage, overrides in STAGES if stage == "rl_sapo" for o in overrides
                  if not o.startswith("stage.train_steps="))]


def read_records(metrics_file: Path) -> list[dict]:
    """The per-step records of a stage's ``metrics.jsonl`` (one JSON object per line)."""
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]


def prepare(demo: Path, out: Path) -> Path:
    """Check the demo output, build its RL prompt set if missing, copy its SFT checkpoint; returns the run root."""
    for need in ("runs/sft/checkpoints/latest", "runs/sft/config.yaml", "raw/eval.jsonl", "raw/rl.jsonl",
                 "tokenizer/tokenizer_info.json"):
        if not (demo / need).is_file():
            raise SystemExit(f"bench_rl: --demo-out {demo}: missing {need} (run python -m pretrain.demo --out {demo})")
    if not (demo / "shards" / "rl" / "index.json").is_file():
        run([PY, "-m", "data_tools", "build-rl", "--manifest", str(demo / "raw" / "rl.jsonl"),
             "--out", str(demo / "shards" / "rl"), "--no-progress"])
    runs = out / "runs"
    if not (runs / "sft" / "checkpoints" / "latest").is_file():
        shutil.rmtree(runs / "sft", ignore_errors=True)
        shutil.copytree(demo / "runs" / "sft" / "checkpoints", runs / "sft" / "checkpoints")
        shutil.copy2(demo / "runs" / "sft" / "config.yaml", runs / "sft" / "config.yaml")  # pretrain.evaluate reads it
    return runs


def run_method(method: str, demo: Path, runs: Path, args: argparse.Namespace) -> dict:
    """One RL stage from the SFT checkpoint, then held-out accuracy of each checkpoint it kept."""
    stage_dir = runs / f"rl_{method}"
    if stage_dir.exists():
        print(f"\n(deleting {stage_dir} from an earlier run: the stage starts from the SFT checkpoint)")
        shutil.rmtree(stage_dir)
    torchrun = [str(Path(PY).with_name("torchrun")), "--nproc-per-node", "2", "-m", "pretrain.train"]
    started = time.perf_counter()
    run(torchrun + [f"stage=rl_{method}", *RL_OVERRIDES, f"data.root={demo / 'shards'}",
                    f"data.tokenizer={demo / 'tokenizer'}", f"train.run_root={runs}", f"train.seed={args.seed}",
                    *model_overrides(demo / "tokenizer"), f"stage.train_steps={args.steps}",
                    f"train.save_interval={args.eval_every}", f"train.keep_last={args.steps // args.eval_every + 1}",
                    *args.overrides], log=runs.parent / "logs" / f"rl_{method}.log")
    train_s = time.perf_counter() - started
    step_dirs = sorted((stage_dir / "checkpoints").glob("step_*"))
    print(f"evaluating rl_{method} steps {', '.join(d.name.removeprefix('step_') for d in step_dirs)} on the "
          "held-out questions ...", flush=True)
    heldout = [{"step": int(d.name.removeprefix("step_")), **result}
               for d, result in zip(step_dirs, evaluate(step_dirs, demo / "raw" / "eval.jsonl"))]
    return {"records": read_records(stage_dir / "metrics.jsonl"), "heldout": heldout, "train_s": train_s,
            "eval_s": time.perf_counter() - started - train_s}


def method_table(method: str, result: dict, sft: dict) -> list[str]:
    """Rows: step, mean reward, pass rate and, at evaluated steps (0 = the SFT start), held-out accuracies."""
    heldout = {0: sft, **{h["step"]: h for h in result["heldout"]}}
    lines = [f"rl_{method}", f"{'step':>5}{'reward':>9}{'pass':>8}{'held-out answer':>17}{'best choice':>13}",
             f"{0:>5}{'':>9}{'':>8}{sft['all']['generated']:>17.1%}{sft['all']['choice']:>13.1%}"]
    for r in result["records"]:
        h = heldout.get(r["step"])
        acc = f"{h['all']['generated']:>17.1%}{h['all']['choice']:>13.1%}" if h else ""
        lines.append(f"{r['step']:>5}{r['reward_mean']:>9.3f}{r['pass_rate']:>8.1%}{acc}")
    return lines


def summary_line(method: str, result: dict, sft: dict) -> str:
    """reward first -> last step and mean over the first -> second half of the steps (single steps are noisy);
    held-out SFT -> last evaluated checkpoint (answer, best choice); wall seconds."""
    records = result["records"]
    first, last, half = records[0], records[-1], max(1, len(records) // 2)
    early, late = (sum(r["reward_mean"] for r in part) / len(part)
                   for part in (records[:half], records[half:] or records))
    end = result["heldout"][-1]["all"] if result["heldout"] else None
    held = (f"held-out answer {sft['all']['generated']:.1%} -> {end['generated']:.1%}, best choice "
            f"{sft['all']['choice']:.1%} -> {end['choice']:.1%}" if end else "held-out: no checkpoint")
    return (f"{method:<5} reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f} (steps {first['step']} -> "
            f"{last['step']}; half means {early:.3f} -> {late:.3f}), {held}; train {result['train_s']:.0f} s, "
            f"eval {result['eval_s']:.0f} s")


def plot_curves(results: dict[str, dict], sft: dict, path: Path) -> None:
    """Two panels: mean reward per RL step; held-out accuracy (answer solid, best choice dashed) per evaluated step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (reward_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, result in results.items():
        steps = [r["step"] for r in result["records"]]
        line, = reward_ax.plot(steps, [r["reward_mean"] for r in result["records"]], label=method)
        evaluated = [{"step": 0, **sft}] + result["heldout"]
        xs = [h["step"] for h in evaluated]
        acc_ax.plot(xs, [h["all"]["generated"] for h in evaluated], "o-", color=line.get_color(),
                    label=f"{method} answer")
        acc_ax.plot(xs, [h["all"]["choice"] for h in evaluated], "s--", color=line.get_color(),
                    label=f"{method} best choice")
    reward_ax.set(title="mean reward per RL step", xlabel="RL step", ylabel="mean reward")
    acc_ax.set(title="held-out accuracy (step 0 = SFT)", xlabel="RL step", ylabel="accuracy", ylim=(0, 1))
    reward_ax.legend()
    acc_ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rl", description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", required=True, help="a finished python -m pretrain.demo --out folder")
    parser.add_argument("--steps", type=int, default=30, help="RL steps per method (default 30)")
    parser.add_argument("--eval-every", type=int, default=10, help="checkpoint + held-out eval interval (default 10)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of sapo,grpo,gspo")
    parser.add_argument("--out", default="bench_rl_out", help="output folder (default bench_rl_out)")
    parser.add_argument("--seed", type=int, default=1234, help="train.seed of every method (default 1234)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every stage, after the bench's own")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods {args.methods!r}: choose from {','.join(METHODS)}")
    if args.steps < 1 or args.eval_every < 1:
        parser.error(f"--steps {args.steps} and --eval-every {args.eval_every} must be >= 1")
    demo, out = Path(args.demo_out).resolve(), Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    runs = prepare(demo, out)
    print("evaluating the SFT checkpoint (step 0) on the held-out questions ...", flush=True)
    sft = evaluate([runs / "sft" / "checkpoints"], demo / "raw" / "eval.jsonl")[0]
    results = {}
    for i, method in enumerate(methods, 1):
        print(f"\n== {i}/{len(methods)}: rl_{method}, {args.steps} steps from {runs / 'sft' / 'checkpoints'}")
        results[method] = run_method(method, demo, runs, args)

    print(f"\n== results ({sft['all']['n']} held-out questions; seed {args.seed})")
    for method, result in results.items():
        print("\n" + "\n".join(method_table(method, result, sft)))
    print()
    for method, result in results.items():
        print(summary_line(method, result, sft))
    (out / "bench_rl.json").write_text(json.dumps(
        {"steps": args.steps, "eval_every": args.eval_every, "seed": args.seed, "overrides": args.overrides,
         "sft": sft, "methods": results}, indent=1))
    plot_curves(results, sft, out / "bench_rl.png")
    print(f"\nwrote {out / 'bench_rl.json'} and {out / 'bench_rl.png'}; bench finished in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
