"""`make demo`: the whole pipeline on small built-in data, 2 CPU ranks, about five minutes on 2 cores.

    python -m pretrain.demo [--out demo_out] [--layout ep2|tp2_ep2_sp] [--quick] [--from-parents]

1. ``python -m data_tools synth``: a synthetic corpus of coloured shapes and moving-shape videos
   (with a few deliberately broken inputs), then the four shard builders and a small BPE tokenizer;
2. the stages of the Qwen3-VL recipe on a tiny MoE Qwen3-VL, each one ``torchrun -m
   pretrain.train stage=...`` command with CPU-sized overrides (short sequences, few steps), 2 gloo
   ranks in a non-trivial layout (S3 with context parallelism), each stage starting from the previous
   stage's checkpoint: S0, S1, S2, S3, SFT, then reinforcement learning with SAPO;
3. a table per stage (layout, steps, tokens, loss (RL: mean reward) first -> last, wall time) and the
   held-out accuracy of the S0, SFT and RL models on questions about images and videos none of them saw.

Every command is printed before it runs, so each step can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
# (stage, CPU-sized overrides). Sequence lengths keep the 8K -> 32K -> 256K progression's shape; S3, the
# long-context stage, runs with context parallelism as on a cluster (each sequence over both ranks).
STAGES = [
    ("s0_align", ["stage.seq_length=512", "stage.train_steps=20", "stage.optimizer.lr=2e-3",
                  "stage.optimizer.warmup_steps=3"]),
    ("s1_pretrain", ["stage.seq_length=512", "stage.train_steps=100", "stage.optimizer.lr=2e-3",
                     "stage.optimizer.min_lr=2e-4", "stage.optimizer.warmup_steps=10"]),
    ("s2_long_32k", ["stage.seq_length=1024", "stage.train_steps=10", "stage.optimizer.lr=5e-4",
                     "stage.optimizer.min_lr=1e-4", "stage.optimizer.warmup_steps=2"]),
    ("s3_long_256k", ["parallel=cp2", "parallel.ep=2", "stage.seq_length=2048", "stage.train_steps=3",
                      "stage.optimizer.lr=3e-4", "stage.optimizer.min_lr=1e-4", "stage.optimizer.warmup_steps=1"]),
    ("sft", ["stage.seq_length=512", "stage.train_steps=100", "stage.optimizer.lr=1e-3",
             "stage.optimizer.min_lr=1e-4", "stage.optimizer.warmup_steps=5"]),
    # Post-training: SAPO on closed questions about images and videos no other stage saw (data_tools synth's
    # rl.jsonl, 400 prompts), 32 prompts x G=8 responses per step sampled at temperature 0.5, exact-match +
    # format rewards, 2 updates (mini-batches of 128 responses) per step. At temperature 1 this small model
    # spreads its samples over wrong kinds of answers (a colour for a shape); at 0.5 the responses of a
    # group compete among its few likeliest answers, which is what greedy decoding picks from.
    ("rl_sapo", ["stage.train_steps=40", "stage.rl.prompts_per_step=32", "stage.rl.group_size=8",
                 "stage.rl.temperature=0.5", "stage.rl.max_new_tokens=4", "stage.rl.updates_per_step=2",
                 "train.micro_batch_size=16", "stage.optimizer.lr=2e-4"]),
]
RL_PROMPTS = 400  # questions for the RL stage, about media no other stage (nor the held-out set) uses
EVAL_QUESTIONS = 240  # held-out questions (accuracy within about +-3 points at 50 %)
BUILDS = [("build-image-text", "image_text"), ("build-interleaved", "interleaved"),
          ("build-video", "video"), ("build-sft", "sft"), ("build-rl", "rl"), ("build-sft", "text")]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(cmd: list[str], log: Path | None = None) -> None:
    """Run a command, print it first; its output goes to the console (and to ``log``)."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV) as proc:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        proc.wait()
    if log is not None:
        log.write_text("".join(lines))
    if proc.returncode:
        raise SystemExit(f"demo: command failed with exit code {proc.returncode}: {shlex.join(cmd)}")


def run_pairwise(cmds: list[list[str]], quiet: bool = False) -> list[str]:
    """Run one-process commands two at a time (one per core), each printed with its output once it
    ends, in the given order; their outputs. The first failure stops the demo."""
    # printed commands show their warnings too; a quiet one's stdout is its result alone
    stderr = subprocess.PIPE if quiet else subprocess.STDOUT

    def start(cmd):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)

    outputs = []
    pending = [start(c) for c in cmds[:2]]
    for i, cmd in enumerate(cmds):
        out, err = pending[i].communicate()
        err = err or ""
        if i + 2 < len(cmds):
            pending.append(start(cmds[i + 2]))
        if pending[i].returncode:
            for proc in pending[i + 1:]:
                proc.kill()
            raise SystemExit(f"demo: command failed with exit code {pending[i].returncode}: {shlex.join(cmd)}\n"
                             f"{(out + err)[-3000:]}")
        if not quiet:
            print(f"\n$ {shlex.join(cmd)}\n{out.rstrip()}", flush=True)
        outputs.append(out)
    return outputs


def model_overrides(tokenizer_dir: Path) -> list[str]:
    """The tiny model's vocabulary and special token ids, taken from the trained tokenizer."""
    info = json.loads((tokenizer_dir / "tokenizer_info.json").read_text())
    ids = info["special_token_ids"]
    vocab = max(ids.values()) + 1
    padded = -(-vocab // 128) * 128  # divisible by any tensor-parallel size we use
    return [f"model.text.vocab_size={padded}", f"model.image_token_id={ids['<|image_pad|>']}",
            f"model.video_token_id={ids['<|video_pad|>']}", f"model.vision_start_token_id={ids['<|vision_start|>']}",
            f"model.vision_end_token_id={ids['<|vision_end|>']}"]


def layout_name(layout: dict) -> str:
    """``tp2·ep2`` for the parallel sizes above 1 of a checkpoint's recorded layout (``dp`` for none)."""
    parts = [f"{k}{layout[k]}" for k in ("tp", "pp", "cp", "ep") if layout.get(k, 1) > 1]
    return "·".join(parts) or f"dp{layout.get('dp', 1)}"


def stage_table(run_root: Path) -> list[dict]:
    rows = []
    for stage, _ in STAGES:
        path = run_root / stage / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        latest = run_root / stage / "checkpoints" / "latest"
        layout = "?"
        if latest.is_file():
            trainer_state = latest.parent / latest.read_text().strip() / "trainer.json"
            layout = layout_name(json.loads(trainer_state.read_text())["layout"])
        if "reward_mean" in records[0]:
            # RL: the mean reward (the policy loss hovers around 0 by construction), averaged over the first
            # and the last quarter of the steps: each step draws other prompts, so single steps are noisy.
            k = max(1, len(records) // 4)
            measure, first, last = "reward", [r["reward_mean"] for r in records[:k]], [r["reward_mean"] for r in records[-k:]]
        else:
            measure, first, last = "loss", [records[0]["loss"]], [records[-1]["loss"]]
        rows.append({
            "layout": layout,
            "stage": stage, "steps": records[-1]["step"], "tokens": records[-1]["consumed_tokens"],
            "first": sum(first) / len(first), "last": sum(last) / len(last), "measure": measure,
            "seconds": sum(r["step_seconds"] for r in records),
        })
    return rows


def evaluate(ckpts: list[Path], eval_file: Path) -> list[dict]:
    """Held-out accuracy of each checkpoint (``python -m pretrain.evaluate``, two at a time)."""
    outputs = run_pairwise([[PY, "-m", "pretrain.evaluate", "--ckpt", str(c), "--eval", str(eval_file), "--json"]
                            for c in ckpts], quiet=True)
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="working folder (default demo_out)")
    # ep2 (data parallel + experts over both ranks) is the faster of the two on 2 CPU cores: tp2 adds
    # gloo collectives inside every layer (1.6 s vs 1.0 s per S1 step here).
    parser.add_argument("--layout", default="ep2", choices=["ep2", "tp2_ep2_sp"],
                        help="parallel layout of the 2 ranks (conf/parallel) for every stage but S3 (cp2 x ep2)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke run)")
    parser.add_argument("--from-parents", action="store_true",
                        help="S0 from a composed Qwen3 LLM + SigLIP-2 instead (pretrain/demo_parents.py)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    raw, shards, tokenizer, logs = (out / p for p in ("raw", "shards", "tokenizer", "logs"))
    # A quick run's 3-step stages in a folder of their own: a full run resuming one of them would meet a
    # learning-rate schedule over other steps, which a resume refuses (and the reverse would train nothing).
    runs = out / ("runs_quick" if args.quick else "runs")
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print("== 1. data: synthetic corpus -> validated WebDataset shard sets -> tokenizer")
    run([PY, "-m", "data_tools", "synth", "--out", str(raw), "--rl", str(RL_PROMPTS), "--eval", str(EVAL_QUESTIONS),
         "--overwrite"])
    # two builds at a time, each with one validation process: one per core
    run_pairwise([[PY, "-m", "data_tools", command, "--manifest", str(raw / f"{name}.jsonl"), "--out",
                   str(shards / name), "--workers", "1", "--overwrite", "--no-progress"] for command, name in BUILDS])
    run([PY, "-m", "data_tools", "train-tokenizer", *[a for name in ("image_text", "interleaved", "video", "sft")
                                                      for a in ("--manifest", str(raw / f"{name}.jsonl"))],
         "--vocab-size", "1024", "--out", str(tokenizer)])

    common = ["model=tiny_moe", "data=synth", f"data.root={shards}",
              f"data.tokenizer={tokenizer}", f"train.run_root={runs}", "train.global_batch_size=8",
              "train.micro_batch_size=1", "train.log_interval=10", "train.save_interval=1000000",
              "stage.train_tokens=null", *model_overrides(tokenizer)]
    torchrun = [str(Path(PY).with_name("torchrun")), "--nproc-per-node", "2", "-m", "pretrain.train"]
    if args.from_parents:
        from pretrain.demo_parents import run_from_parents

        return run_from_parents(out, common, torchrun, args.layout, args.quick)
    print("\n== 2. training: S0 -> S1 -> S2 -> S3 -> SFT -> RL (SAPO) on 2 gloo ranks")
    for stage, overrides in STAGES:
        if args.quick:
            overrides = [o for o in overrides if not o.startswith("stage.train_steps")] + ["stage.train_steps=3"]
        if (runs / stage / "checkpoints" / "latest").is_file():
            print(f"\n(stage {stage}: {runs / stage} already holds a checkpoint; the stage resumes from it)")
        layout = [] if any(o.startswith("parallel=") for o in overrides) else [f"parallel={args.layout}"]
        run(torchrun + [f"stage={stage}", *layout, *common, *overrides], log=logs / f"{stage}.log")

    print("\n== 3. results")
    rows = stage_table(runs)
    print(f"{'stage':<14}{'layout':<10}{'steps':>6}{'tokens':>10}{'first -> last':>24}{'wall s':>9}")
    for r in rows:
        print(f"{r['stage']:<14}{r['layout']:<10}{r['steps']:>6}{r['tokens']:>10}{r['measure']:>8}{r['first']:>7.3f} -> "
              f"{r['last']:<7.3f}{r['seconds']:>9.1f}")
    eval_file = raw / "eval.jsonl"
    models = (("S0 (alignment only)", "s0_align"), ("after SFT", "sft"), ("after RL (SAPO)", "rl_sapo"))
    results = list(zip([name for name, _ in models],
                       evaluate([runs / stage / "checkpoints" for _, stage in models], eval_file)))
    print(f"\nheld-out questions about unseen synthetic images and videos ({results[0][1]['all']['n']} questions, "
          "asked neither in SFT nor in RL):")
    print(f"{'model':<22}{'answer correct':>16}{'best choice correct':>22}{'images':>9}{'videos':>9}")
    for name, result in results:
        print(f"{name:<22}{result['all']['generated']:>16.1%}{result['all']['choice']:>22.1%}"
              f"{result.get('image', {}).get('generated', 0):>9.1%}{result.get('video', {}).get('generated', 0):>9.1%}")
    gain = results[2][1]["all"]["generated"] - results[1][1]["all"]["generated"]
    print(f"RL over SFT: {gain * 100:+.1f} points (answer correct)")
    example = json.loads(eval_file.read_text().splitlines()[0])
    print("\ntry it: " + shlex.join([PY, "-m", "pretrain.generate", "--ckpt", str(runs / "rl_sapo" / "checkpoints"),
                                     f"--{example['media_type']}", str(raw / example["media"]),
                                     "--prompt", example["question"]]))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; logs in {logs}, TensorBoard: "
          f"tensorboard --logdir {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
