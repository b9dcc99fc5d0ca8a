"""pretrain.train end to end on 2 gloo ranks: exact resume after SIGKILL and in another layout, stage
hand-over, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "-m", "pretrain.train"]


def _stage_args(synth_data, run_root: Path, *extra: str, parallel: str = "ep2") -> list[str]:
    return [*synth_data.overrides, f"train.run_root={run_root}", f"parallel={parallel}", "stage=s1_pretrain",
            "stage.init_from=null", "stage.train_tokens=null", "stage.train_steps=6", "stage.seq_length=256",
            "train.global_batch_size=4", "train.save_interval=2", "train.log_interval=1",
            "stage.optimizer.warmup_steps=1", *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _records(run_root: Path, stage: str = "s1_pretrain") -> list[dict]:
    return [json.loads(line) for line in (run_root / stage / "metrics.jsonl").read_text().splitlines()]


def _losses(run_root: Path, stage: str = "s1_pretrain") -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(run_root, stage)]


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + args, capture_output=True, text=True, env=_env(), timeout=600)


def _resume_from_step_4(synth_data, run_root: Path, resumed: Path, parallel: str,
                        *extra: str) -> subprocess.CompletedProcess:
    """The 6-step stage of ``_stage_args`` in ``parallel`` (with overrides ``extra``), resumed in
    ``resumed`` from a copy of ``run_root``'s step-4 checkpoint."""
    checkpoints = resumed / "s1_pretrain" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(run_root / "s1_pretrain/checkpoints/step_00000004", checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000004\n")
    return _train(_stage_args(synth_data, resumed, *extra, parallel=parallel))


@pytest.fixture(scope="module")
def straight(synth_data, tmp_path_factory) -> Path:
    """The run root of one uninterrupted 6-step run (ep2, checkpoints at steps 4 and 6 kept): the
    reference the interrupted and the resumed runs below are compared with (read only)."""
    run_root = tmp_path_factory.mktemp("straight")
    done = _train(_stage_args(synth_data, run_root))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_root


def test_each_step_logs_the_learning_rate_it_trained_with_and_its_flops(straight):
    """Warm-up of 1 step from 0: step 1 trains at 0 and says so, step 2 at the peak (the WSD schedule's
    stable phase), then the decay to min_lr over the last 10 % (one step of six). Not the rate the
    scheduler set for the next step, which logged the peak for step 1."""
    records = _records(straight)
    assert [r["lr"] for r in records[:5]] == pytest.approx([0.0, 2e-4, 2e-4, 2e-4, 2e-4])
    assert all(r["model_flops"] > 0 for r in records)


def test_sigkill_and_restart_gives_the_same_losses(synth_data, straight, tmp_path):
    reference = dict(_losses(straight))
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(TORCHRUN + _stage_args(synth_data, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    metrics = killed / "s1_pretrain" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and both ranks, mid-run, no clean-up
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    logged_before_kill = len(_losses(killed))
    assert 3 <= logged_before_kill < 6
    latest = (killed / "s1_pretrain" / "checkpoints" / "latest").read_text().strip()

    done = _train(_stage_args(synth_data, killed))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from" in done.stdout and latest in done.stdout
    resumed = _losses(killed)
    # Every step, including those repeated after the restart, has the uninterrupted run's loss.
    assert {step for step, _ in resumed} == set(reference)
    for step, loss in resumed:
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    state = json.loads((killed / "s1_pretrain/checkpoints" / "step_00000006" / "trainer.json").read_text())
    reference_state = json.loads((straight / "s1_pretrain/checkpoints/step_00000006/trainer.json").read_text())
    assert state["consumed_tokens"] == reference_state["consumed_tokens"] > 0
    # keep-last-k: only the newest two checkpoints remain.
    assert sorted(p.name for p in (killed / "s1_pretrain/checkpoints").glob("step_*")) == \
        ["step_00000004", "step_00000006"]


def test_resume_in_another_layout_trains_on_the_data_that_follows(synth_data, straight, tmp_path):
    """Saved with data-parallel size 2 (ep2), resumed with tensor parallelism and data-parallel size 1
    (tp2_ep2_sp): the resumed steps train on the uninterrupted run's global batches, with its losses."""
    reference = {r["step"]: r for r in _records(straight)}

    resumed = tmp_path / "resumed"
    done = _resume_from_step_4(synth_data, straight, resumed, parallel="tp2_ep2_sp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout and "(step 4) in another layout" in done.stdout
    records = _records(resumed)
    assert [r["step"] for r in records] == [5, 6]
    for record in records:
        want = reference[record["step"]]
        # The same documents in each global batch (not the first batches of a restarted stream) ...
        assert record["data_fingerprint"] == want["data_fingerprint"], record["step"]
        assert record["consumed_tokens"] == want["consumed_tokens"]
        assert "data_resume" not in record
        # ... and the same loss: measured relative difference ~2e-8 (fp32 sums in another order); the
        # losses of different batches differ by > 1e-3.
        assert record["loss"] == pytest.approx(want["loss"], rel=1e-5), record["step"]
    assert records[0]["data_fingerprint"] not in [reference[step]["data_fingerprint"] for step in (1, 2, 3, 4)]
    final = resumed / "s1_pretrain/checkpoints/step_00000006"
    state = json.loads((final / "trainer.json").read_text())
    assert state["data_streams"] == 2 and state["data_resumes"] == []
    assert sorted(p.name for p in (final / "data").iterdir()) == ["stream_00000.pt", "stream_00001.pt"]
    # The torchrun ranks print none of the warnings common/quiet.py silences.
    assert "UserWarning" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr[-3000:]


def test_a_resume_with_another_budget_is_refused(synth_data, straight, tmp_path):
    """The 6-step stage's step-4 checkpoint resumed as the same token budget (6 x 4 sequences of 256) over a
    global batch of 2: 12 steps, while the saved learning-rate schedule ends at step 6. It trained 8 more
    steps, 6 of them at min_lr, on a third more tokens than the budget; now one line, before any step."""
    resumed = tmp_path / "resumed"
    done = _resume_from_step_4(synth_data, straight, resumed, "ep2", "stage.train_steps=null",
                               "stage.train_tokens=6144", "train.global_batch_size=2")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and "step_00000004: its learning-rate schedule spans 6 optimizer steps, this run's 12" in errors[0]
    assert not (resumed / "s1_pretrain/metrics.jsonl").exists() or not _records(resumed)


def test_a_resume_with_other_schedule_settings_is_refused(tmp_path):
    """Megatron's scheduler restores the saved settings over the job's: a resume with another lr or
    schedule trained silently with the old ones (and a WSD -> cosine change crashed in Megatron). The
    settings are compared (in-process: the real scheduler over a torch optimizer)."""
    import dataclasses

    import torch

    from pretrain.checkpoint import CheckpointError, TrainerState
    from pretrain.cli import load_job
    from pretrain.lr_schedule import build_lr_scheduler
    from pretrain.trainer import check_resumed_schedule, schedule_state

    _, job = load_job(["stage=s1_pretrain"])
    opt = job.stage.optimizer

    def scheduler(**changes):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        return build_lr_scheduler(optimizer, dataclasses.replace(opt, **changes), 100)

    saved = TrainerState(stage="s1_pretrain", step=40, scheduler=schedule_state(scheduler()))
    check_resumed_schedule(tmp_path, saved, scheduler(), 100)  # the same settings resume
    with pytest.raises(CheckpointError) as error:
        check_resumed_schedule(tmp_path, saved, scheduler(lr=1e-4, schedule="cosine"), 100)
    assert "stage.optimizer.lr: saved 0.0002, now 0.0001" in str(error.value)
    assert "stage.optimizer.schedule: saved WSD, now cosine" in str(error.value)
    with pytest.raises(CheckpointError, match=r"decay_fraction \(WSD decay steps\): saved 10, now 20"):
        check_resumed_schedule(tmp_path, saved, scheduler(decay_fraction=0.2), 100)
    check_resumed_schedule(tmp_path, saved, scheduler(lr=1e-4), 40)  # at its budget: trains no step
    # A constant rate does not depend on the span: a constant-schedule run may be extended.
    constant = TrainerState(stage="s1_pretrain", step=40, scheduler=schedule_state(
        build_lr_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]),
                           dataclasses.replace(opt, schedule="constant", warmup_steps=0), 50)))
    check_resumed_schedule(tmp_path, constant, scheduler(schedule="constant", warmup_steps=0), 100)

    # An RL stage's schedule spans train_steps x updates_per_step: a changed updates_per_step is named.
    rl_saved = TrainerState(stage="rl", step=10, scheduler=schedule_state(scheduler()))  # 50 steps x 2 updates
    three_updates = build_lr_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), opt, 150)
    with pytest.raises(CheckpointError, match=r"spans 100 optimizer steps, this run's 150: .*updates_per_step"):
        check_resumed_schedule(tmp_path, rl_saved, three_updates, 50)


def test_a_resume_without_stream_positions_warns_and_records_it(synth_data, tmp_path):
    """A checkpoint that holds no data stream positions (data_streams 0): the loader skips the consumed
    sequences in new streams, and the trainer state records the warning; positions saved with other
    data settings are a checkpoint error (in-process, no model)."""
    import torch

    from common.tokens.tokenizer import load_tokenizer
    from pretrain.checkpoint import CheckpointError, CheckpointManager, TrainerState
    from pretrain.cli import load_job
    from pretrain.trainer import _open_train_data

    _, job = load_job(_stage_args(synth_data, tmp_path, "data.packing_buffer_size=32"))
    tokenizer = load_tokenizer(job.data.tokenizer)
    manager = CheckpointManager(tmp_path)
    state = TrainerState(step=2, consumed_samples=8)
    with _open_train_data(job, state, manager, tmp_path / "step_00000002", tokenizer, 1, 2)[0] as loader:
        warning = state.data_resumes[0]["warning"]
        assert "the checkpoint holds no data stream states" in warning
        assert state.data_resumes == [{"step": 2, "warning": warning}] and state.data_streams == 2
        with _open_train_data(job, TrainerState(), manager, None, tokenizer, 1, 2)[0] as fresh:
            for _ in range(4):  # 2 steps of 2 micro-batches on this rank
                next(fresh)
            assert next(loader)["doc_ids"] == next(fresh)["doc_ids"]

    # Saved positions of streams with other settings (another sequence length): a one-line error.
    checkpoint = tmp_path / "step_00000002"
    (checkpoint / "data").mkdir(parents=True)
    with _open_train_data(job, TrainerState(), manager, None, tokenizer, 0, 1)[0] as saved:
        torch.save(saved.save_state()[0], checkpoint / "data" / "stream_00000.pt")
    _, shorter = load_job(_stage_args(synth_data, tmp_path, "data.packing_buffer_size=32", "stage.seq_length=128"))
    with pytest.raises(CheckpointError, match="step_00000002: .*seq_length: saved 256, now 128"):
        _open_train_data(shorter, TrainerState(step=2, consumed_samples=8, data_streams=1), manager, checkpoint,
                         tokenizer, 0, 1)


@pytest.mark.slow
def test_interleaved_pipeline_checkpoint_resumes_without_interleaving(synth_data, tmp_path):
    """pp2 with two virtual stages per rank (the interleaved schedule; tests/test_layouts_train_same.py
    shows it trains like one process): its checkpoint (two model chunks per rank, with the distributed
    optimizer's state) resumes in plain pp2 with the interleaved run's losses."""
    interleaved = tmp_path / "interleaved"
    done = _train(_stage_args(synth_data, interleaved, "parallel.vpp=2", parallel="pp2"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = dict(_losses(interleaved))

    resumed = tmp_path / "resumed"
    done = _resume_from_step_4(synth_data, interleaved, resumed, parallel="pp2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert [step for step, _ in _losses(resumed)] == [5, 6]
    for step, loss in _losses(resumed):
        assert step in (5, 6) and loss == pytest.approx(losses[step], rel=1e-5), step


@pytest.mark.slow
def test_next_stage_starts_from_the_previous_checkpoint_in_another_layout(synth_data, tmp_path):
    first = _train(_stage_args(synth_data, tmp_path, "stage.train_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train([*synth_data.overrides, f"train.run_root={tmp_path}", "stage=sft", "parallel=tp2_ep2_sp",
                     f"stage.init_from={tmp_path}/s1_pretrain/checkpoints", "stage.train_steps=2",
                     "stage.seq_length=256", "train.global_batch_size=2", "stage.optimizer.warmup_steps=1"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"weights from {tmp_path}/s1_pretrain/checkpoints/step_00000002" in second.stdout
    assert [s for s, _ in _losses(tmp_path, "sft")] == [1, 2]


def test_bad_inputs_are_one_line_errors(synth_data, tmp_path):
    from common.distributed.spawn import free_port

    cases = {"missing": [f"stage.init_from={tmp_path}/nothing"],
             "layout": ["parallel.ep=1", "parallel.tp=4", "parallel.sequence_parallel=true"],
             "tokenizer": ["model.image_token_id=3"]}
    # The three jobs at once (each its own run folder and rendezvous port): most of their time is starting up.
    running = {name: subprocess.Popen([TORCHRUN[0], "--master-port", str(free_port()), *TORCHRUN[1:],
                                       *_stage_args(synth_data, tmp_path / name, *extra)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
               for name, extra in cases.items()}
    outputs = {name: proc.communicate(timeout=600) for name, proc in running.items()}
    missing, layout, tokenizer = (subprocess.CompletedProcess(running[n].args, running[n].returncode, *outputs[n])
                                  for n in cases)
    assert missing.returncode != 0 and "init_from=" in missing.stderr and "no checkpoint there" in missing.stderr
    assert layout.returncode != 0 and "world size 2 is not divisible by tp*pp*cp = 4*1*1 = 4" in layout.stderr
    assert tokenizer.returncode != 0 and "model.image_token_id=3 but the tokenizer has" in tokenizer.stderr
    for done in (missing, layout, tokenizer):
        # torchrun reports the failed ranks with its own traceback; the ranks themselves print none.
        assert not [line for line in done.stderr.splitlines()
                    if line.strip().startswith('File "') and "/pretrain/" in line], done.stderr[-3000:]


def _hf_parity_body(rank, ckpt, hf_dir, image):
    """Logits of our trained checkpoint and of its HF export loaded by transformers, same input."""
    import transformers
    from PIL import Image

    from pretrain.generate import encode_prompt, load_inference_model

    im = load_inference_model(ckpt)
    inputs = encode_prompt(im, Image.open(image).convert("RGB"), "image", "What colour is the shape?")
    ours = im.model(inputs["input_ids"][None], inputs["position_ids"][:, None, :],
                    pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, torch_dtype="float32").eval()
    ids = inputs["input_ids"][None]
    mm_types = (ids == im.model.cfg.image_token_id).long()
    reference = hf(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                   mm_token_type_ids=mm_types).logits
    return type(hf).__name__, float((ours.detach() - reference.detach()).abs().max())


@pytest.mark.slow
def test_final_checkpoint_exports_to_a_transformers_model(synth_data, tmp_path):
    from tests.multirank import run_ranks

    done = _train([*synth_data.overrides, f"train.run_root={tmp_path}", "stage=sft", "parallel=ep2",
                   "stage.init_from=null", "stage.train_steps=2", "stage.seq_length=256",
                   "train.global_batch_size=2", "stage.optimizer.warmup_steps=1"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    hf_dir = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "model.convert", "mcore-to-hf", "--ckpt",
                             str(tmp_path / "sft" / "checkpoints"), "--out", str(hf_dir)],
                            capture_output=True, text=True, env=_env())
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    image = next((synth_data.raw / "images").iterdir())
    ((name, diff),) = run_ranks(_hf_parity_body, 1, str(tmp_path / "sft" / "checkpoints"), str(hf_dir), str(image))
    assert name == "Qwen3VLMoeForConditionalGeneration"
    assert diff < 1e-4


@pytest.mark.parametrize("change, message", [
    (["data.root=/nonexistent/shards"], "/nonexistent/shards/image_text does not exist"),
    (["train.global_batch_size=3", "train.micro_batch_size=2"], "train.global_batch_size=3 is not divisible"),
])
def test_a_bad_setting_found_at_start_up_is_one_line(synth_data, tmp_path, change, message):
    """Errors only the run can find (the data folders, the batch over the data-parallel ranks): one line
    naming the setting, exit status 1, no traceback."""
    args = [a for a in _stage_args(synth_data, tmp_path, parallel="single") if not a.startswith("data.root=")]
    args = [*args, *(a for a in [f"data.root={synth_data.shards}"] if not change[0].startswith("data.root="))]
    done = subprocess.run([sys.executable, "-m", "pretrain.train", *args, *change], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


_SIGNAL_AT_LAST_STEP = """
import os, signal, sys
import pretrain.trainer as trainer
from pretrain.train import main

original, calls = trainer.train_step, []

def train_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # during the last step of the 2-step stage: SLURM's warning before the time limit
        os.kill(os.getpid(), signal.SIGUSR1)
    return original(*args, **kwargs)

trainer.train_step = train_step
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_signal_during_the_last_step_finishes_the_stage(synth_data, tmp_path):
    """SIGUSR1 in the last step: the final checkpoint is saved and the stage ends as finished (exit 0), not
    as stopped early (exit 3, which makes a job chain cancel the next stage) nor requeued."""
    args = [*_stage_args(synth_data, tmp_path, "stage.train_steps=2", parallel="single")]
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AT_LAST_STEP, *args], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "received at the last step: stage finished" in done.stdout + done.stderr
    assert (tmp_path / "s1_pretrain/checkpoints/latest").read_text().strip() == "step_00000002"


def test_checkpoints_carry_the_starting_checkpoints_hf_files(synth_data, tmp_path):
    """A stage started from a converted HF checkpoint writes its processor and generation configs into
    every checkpoint (mcore-to-hf then gives a folder AutoProcessor loads); the tokenizer is the stage's."""
    import torch

    from common.tokens.tokenizer import Tokenizer
    from model.config import Qwen3VLConfig
    from pretrain.cli import load_job
    from pretrain.trainer import checkpoint_description

    start = tmp_path / "converted"
    (start / "hf_extra").mkdir(parents=True)
    (start / "hf_extra" / "preprocessor_config.json").write_text('{"patch_size": 16}')
    (start / "hf_extra" / "tokenizer.json").write_text("{}")  # not the stage's tokenizer: not carried
    tokenizer = Tokenizer.from_dir(synth_data.tokenizer)
    _, job = load_job(list(synth_data.overrides))
    describe = checkpoint_description(Qwen3VLConfig.from_mapping(job.model), torch.float32, tokenizer, "sft", start)
    (tmp_path / "step").mkdir()
    describe(tmp_path / "step")
    extra = tmp_path / "step" / "hf_extra"
    assert (extra / "preprocessor_config.json").read_text() == '{"patch_size": 16}'
    assert Tokenizer.from_dir(extra).vocab_size == tokenizer.vocab_size
