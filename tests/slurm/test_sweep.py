"""slurm.submit --sweep: one job per combination of the swept values, each in its own run folder, every
combination validated and planned before anything is submitted."""

from __future__ import annotations

import re

import pytest

from pretrain.config import ConfigError
from slurm.submit import main as submit_main
from slurm.sweep import sweep_combinations
from tests.slurm.test_submit import _recording_sbatch

FIXED = ["stage=s1_pretrain", "cluster=example_h100", "data.max_visual_patches_per_pack=16384",
         "stage.recompute.granularity=full"]
SWEEP = ["--sweep", "stage.optimizer.lr=1e-4,3e-4", "model=qwen3vl_2b,qwen3vl_4b"]
COMBINATIONS = [("0.0001", "qwen3vl_2b"), ("0.0001", "qwen3vl_4b"), ("0.0003", "qwen3vl_2b"), ("0.0003", "qwen3vl_4b")]


def test_dry_run_renders_one_script_per_combination(tmp_path, capsys):
    code = submit_main(["--dry-run", "--workdir", str(tmp_path), *FIXED, *SWEEP])
    out, err = capsys.readouterr()
    assert code == 0, err
    scripts = out.split("\n# ===== ")[1:]
    assert len(scripts) == 4
    run_dirs = []
    for script, (lr, model) in zip(scripts, COMBINATIONS):
        label = f"lr-{lr}_model-{model}"
        assert script.startswith(f"s1_pretrain-{label}: 16 ranks")
        assert f"/slurm_logs/s1_pretrain-{label}-" in script.splitlines()[1]  # its own script file
        train = script[script.index(" -m pretrain.train "):].splitlines()[0].split()[2:]
        run_dir = f"runs/s1_pretrain/{label}"
        assert train == [*FIXED, f"stage.optimizer.lr={lr}", f"model={model}", f"train.run_dir={run_dir}"]
        assert "(( LATEST_STEP < " in script and f'checkpoints in "{run_dir}")' in script
        assert "--dependency" not in script.splitlines()[1]  # the jobs of a sweep do not wait for each other
        run_dirs.append(run_dir)
    assert len(set(run_dirs)) == 4
    # Every combination has its own capacity plan, checked against the cluster's GPUs.
    plans = re.findall(r"^# plan: (qwen3vl_\w+) .*$", out, flags=re.M)
    assert plans == [model for _, model in COMBINATIONS]
    assert len(re.findall(r"^#   GPU memory: .* fits$", out, flags=re.M)) == 4
    table = out[out.index("# sweep: 4 job(s)"):].splitlines()[1:]
    assert [row.split()[3:] for row in table[1:]] == [
        [f"runs/s1_pretrain/lr-{lr}_model-{model}", f"stage.optimizer.lr={lr}", f"model={model}"]
        for lr, model in COMBINATIONS]
    assert not (tmp_path / "slurm_logs").exists()


def test_submit_prints_the_job_ids_and_refuses_a_combination_over_memory(tmp_path, capsys, monkeypatch):
    calls = _recording_sbatch(tmp_path, monkeypatch)
    assert submit_main(["--workdir", str(tmp_path), *FIXED, "--after", "41", *SWEEP]) == 0
    out = capsys.readouterr().out
    submitted = calls.read_text().splitlines()
    assert len(submitted) == 4 and all("--dependency=afterok:41" in line for line in submitted)
    assert len({line.split()[-1] for line in submitted}) == 4  # four script files
    assert len(list((tmp_path / "slurm_logs").glob("s1_pretrain-lr-*_model-*.sbatch"))) == 4
    table = out[out.index("sweep: 4 job(s)"):].splitlines()
    assert table[1].split() == ["job", "id", "run", "dir", "overrides"]
    assert [row.split()[0] for row in table[2:]] == ["1"] * 4  # the stand-in sbatch answers job id 1

    # Without recomputation qwen3vl_4b does not fit 80 GB: refused before the first sbatch, naming the combination.
    calls.unlink()
    code = submit_main(["--workdir", str(tmp_path), *FIXED[:-1], *SWEEP])
    err = capsys.readouterr().err
    assert code == 2 and not calls.exists()
    assert err.startswith("config error: sweep lr-0.0001_model-qwen3vl_4b: stage s1_pretrain: the plan needs ")


def test_sweep_values_and_refusals():
    assert [c.label for c in sweep_combinations(["train.seed=range(1,3)", "data.root='/a,b','/c'"])] == [
        "seed-1_root-a-b", "seed-1_root-c", "seed-2_root-a-b", "seed-2_root-c"]
    assert sweep_combinations(["data.root=/a/b,/a-b"])[1].label == "root-a-b-1"  # kept apart
    with pytest.raises(ConfigError, match="model is swept by --sweep"):
        sweep_combinations(["model=qwen3vl_2b,qwen3vl_4b"], ["model=qwen3vl_8b"])
    with pytest.raises(ConfigError, match="--sweep with --chain"):
        from slurm.submit import _stage_jobs, parse_args

        _stage_jobs(parse_args(["--chain", "s0_align,s1_pretrain", "cluster=local_slurm", "--sweep", "train.seed=1,2"]))


def _rank_arguments(script: str) -> list[str]:
    """What ``python -m pretrain.train`` receives from the script's srun line, as bash splits it."""
    import shlex

    srun = script[script.index("\nsrun "):].split("\n\n")[0].replace("\\\n", " ")
    words = shlex.split(srun)
    return words[words.index("pretrain.train") + 1:]


@pytest.mark.parametrize("chain", [False, True])
def test_run_folders_with_any_characters_reach_the_ranks_intact(tmp_path, capsys, chain):
    """A run root the user quoted for Hydra (parentheses, a comma, quotes, $, spaces): each job's
    generated train.run_dir (and a chain's stage.init_from) reaches its ranks as that path, and the
    script is valid bash. Written unquoted, the ranks failed to parse their own command line (a comma
    would make Hydra sweep)."""
    import subprocess

    from pretrain.cli import load_job
    from slurm.chain import path_override

    root = str(tmp_path / "exp(1), it's \"odd\" $HOME")
    common = ["--dry-run", "--workdir", str(tmp_path), "model=tiny_moe", "parallel=ep2", "cluster=local_slurm",
              path_override("train.run_root", root)]
    if chain:
        args, expected = [*common, "--chain", "s0_align,s1_pretrain"], [("s0_align", None), ("s1_pretrain", None)]
    else:
        args = [*common, "stage=s1_pretrain", "--sweep", "train.seed=1,2"]
        expected = [("s1_pretrain", "seed-1"), ("s1_pretrain", "seed-2")]
    assert submit_main(args) == 0, capsys.readouterr().err
    scripts = capsys.readouterr().out.split("\n# ===== ")[1:]
    assert len(scripts) == 2
    for i, (script, (stage, label)) in enumerate(zip(scripts, expected)):
        _, job = load_job(_rank_arguments(script))
        assert job.train.run_dir == f"{root}/{stage}" + (f"/{label}" if label else "")
        if chain and i == 1:
            assert job.stage.init_from == f"{root}/s0_align/checkpoints"
        text = script[script.index("#!/bin/bash"):]
        assert subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True).returncode == 0
