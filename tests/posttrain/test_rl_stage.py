"""``python -m pretrain.train stage=rl_sapo`` end to end on 2 gloo ranks (ep2): the reward of a toy task
rises, every step logs its figures and writes its rollouts, a run resumed mid-RL reproduces the
uninterrupted run, and bad setups are one-line errors before any rollout.

The toy task: the synthetic RL prompts (images and videos in the prompt) scored by
``tests.posttrain.toy_rewards.vowel_share``, a graded reward that a randomly initialised model can climb.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer import TORCHRUN, _env

METRICS = ("loss", "grad_norm", "lr", "reward_mean", "pass_rate", "filtered_share", "ratio_dev_mean",
           "ratio_dev_max", "gate_weight_mean", "entropy", "response_length", "rollout_s", "train_s")
STEPS, G, PROMPTS = 8, 8, 4


def _build_rl(raw: Path, out: Path, edit) -> Path:
    lines = []
    for line in (raw / "rl.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record.get("answer"), (str, type(None))):
            lines.append(json.dumps(edit(record)))
    manifest = raw / f"{out.name}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "data_tools", "build-rl", "--manifest", str(manifest), "--out",
                           str(out), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def toy_prompts(synth_data, tmp_path_factory):
    return _build_rl(synth_data.raw, tmp_path_factory.mktemp("rl") / "toy_rl", lambda r: {**r, "reward": "vowel_share"})


def _args(synth_data, prompts: Path, run_root: Path, *extra: str) -> list[str]:
    return [*synth_data.overrides, f"train.run_root={run_root}", "parallel=ep2", "stage=rl_sapo",
            "stage.init_from=null", f"stage.rl.prompts={prompts}", f"stage.rl.prompts_per_step={PROMPTS}",
            f"stage.rl.group_size={G}", "stage.rl.max_new_tokens=6", f"stage.train_steps={STEPS}",
            "stage.rewards=[vowel_share]", "stage.rl.reward_modules=[tests.posttrain.toy_rewards]",
            "stage.rl.filter.enabled=false", "stage.optimizer.lr=3e-2", f"train.micro_batch_size={G}",
            "train.save_interval=4", "data.image_min_pixels=1024", "data.image_max_pixels=4096", *extra]


def _records(run_root: Path) -> dict[int, dict]:
    lines = (run_root / "rl_sapo" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_reward_rises_and_a_resumed_run_reproduces_it(synth_data, toy_prompts, tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(TORCHRUN + _args(synth_data, toy_prompts, straight), capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = _records(straight)
    assert sorted(records) == list(range(1, STEPS + 1))
    for record in records.values():
        missing = [k for k in METRICS if record.get(k) is None]
        assert not missing, (record["step"], missing)
    rewards = [records[s]["reward_mean"] for s in sorted(records)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    # several updates per step: the first is on-policy (r = 1), later ones move the ratio
    assert all(records[s]["updates"] == 2 and records[s]["ratio_dev_max"] > 0 for s in records)
    rollouts = (straight / "rl_sapo" / "rollouts" / "step_00000003.jsonl").read_text().splitlines()
    assert len(rollouts) == PROMPTS * G
    line = json.loads(rollouts[0])
    assert {"prompt", "text", "reward", "advantage", "kept", "length"} <= set(line)

    # Resume from the step-4 checkpoint in a fresh run folder: steps 5..8 are the straight run's.
    resumed = tmp_path / "resumed"
    checkpoints = resumed / "rl_sapo" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(straight / "rl_sapo/checkpoints/step_00000004", checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000004\n")
    done = subprocess.run(TORCHRUN + _args(synth_data, toy_prompts, resumed), capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout
    again = _records(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for step, record in again.items():
        want = records[step]
        assert record["reward_mean"] == pytest.approx(want["reward_mean"], abs=1e-6), step
        assert record["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), step
        assert record["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), step
    assert (resumed / "rl_sapo/rollouts/step_00000006.jsonl").read_text() == \
        (straight / "rl_sapo/rollouts/step_00000006.jsonl").read_text()


def _one_process(synth_data, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.train", *args], capture_output=True, text=True,
                          env=_env(), timeout=300)


@pytest.mark.parametrize("change, message", [
    (["stage.rewards=[no_such_reward]"], "unknown reward 'no_such_reward'"),
    (["stage.rl.group_size=1"], "G=1 must be an integer >= 2"),
])
def test_bad_rl_config_is_one_line_before_any_rollout(synth_data, toy_prompts, tmp_path, change, message):
    args = [a for a in _args(synth_data, toy_prompts, tmp_path) if a != "parallel=ep2"] + change
    done = _one_process(synth_data, args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "rl_sapo").exists()


def test_answer_based_reward_on_prompts_without_answers_is_refused(synth_data, tmp_path):
    prompts = _build_rl(synth_data.raw, tmp_path / "no_answers", lambda r: {**r, "answer": None})
    args = [a for a in _args(synth_data, prompts, tmp_path) if a != "parallel=ep2"]
    args = [a for a in args if not a.startswith("stage.rewards=")] + ["stage.rewards=[exact_match]"]
    done = _one_process(synth_data, args)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "need a reference answer per prompt" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "rl_sapo" / "rollouts").exists()


def test_a_mixed_prompt_set_routes_each_prompt_to_its_own_reward():
    """Records naming different rewards: answers are needed only where the prompt's reward needs one, and a
    record naming a reward the stage does not select is refused with its id."""
    from data_tools.schema import Message
    from pretrain.posttrain.prompt_set import PromptRecord
    from pretrain.posttrain.rl_stage import RLSetupError, _prompt_rewards
    from tests.posttrain import toy_rewards  # noqa: F401  (registers vowel_share)

    def record(i, answer, reward):
        return PromptRecord(id=f"p{i}", messages=(Message("user", "q"),), answer=answer, reward=reward,
                            media={}, key=f"k{i}", source=f"m.jsonl:{i}")

    records = [record(0, "4", "exact_match"), record(1, None, "vowel_share")]
    rewards = _prompt_rewards(records, ["exact_match", "vowel_share", "format"], 2, "set")
    assert rewards.task_rewards == {"exact_match", "vowel_share"}
    with pytest.raises(RLSetupError, match="1 of 2 prompts have none"):
        _prompt_rewards([record(0, None, "exact_match"), records[1]], ["exact_match", "vowel_share"], 2, "set")
    with pytest.raises(RLSetupError, match=r"RL prompt p1 \(m.jsonl:1\) asks for reward 'vowel_share'"):
        _prompt_rewards(records, ["exact_match"], 2, "set")
