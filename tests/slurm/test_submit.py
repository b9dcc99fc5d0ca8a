"""slurm.submit without a cluster: rendered scripts, submit-time validation, stage chains, the script's
own logic (run by bash with stand-ins for srun/scontrol, e.g. for a multi-node allocation)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from pretrain.cli import load_job
from pretrain.config import ConfigError
from slurm.chain import chain_stage_jobs
from slurm.jobs import sbatch_command
from slurm.sbatch import check_job_layout, render_sbatch_script, time_limit_seconds
from slurm.submit import main as submit_main

# Fits the example cluster's 80 GB GPUs once the ViT's patches per sequence are bounded (tests below: the
# same job without the bound does not).
H100 = ["stage=s1_pretrain", "model=qwen3vl_30b_a3b", "parallel=tp4_pp2_ep8", "cluster=example_h100",
        "data.max_visual_patches_per_pack=16384"]
UNBOUNDED_H100 = H100[:-1]
STAGES = ["s0_align", "s1_pretrain", "s2_long_32k", "s3_long_256k", "sft"]


def dry_run(args: list[str], workdir: Path, capsys) -> tuple[int, str, str]:
    code = submit_main(["--dry-run", "--workdir", str(workdir), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_renders_the_cluster_config(tmp_path, capsys):
    code, out, err = dry_run(H100, tmp_path, capsys)
    assert code == 0, err
    sbatch = re.findall(r"^#SBATCH (.*)$", out, flags=re.M)
    logs = tmp_path / "slurm_logs"
    assert sbatch == [
        "--job-name=s1_pretrain", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=16",
        "--time=04:00:00", "--partition=gpu", "--account=my_project", "--qos=normal", "--signal=USR1@600",
        "--requeue", "--open-mode=append", f"--chdir={tmp_path}", f"--output={logs}/%x-%j.out",
        f"--error={logs}/%x-%j.err", "--exclusive", "--mem=0",
    ]
    assert "export NCCL_SOCKET_IFNAME=ib0\n" in out and "export CUDA_DEVICE_MAX_CONNECTIONS=1\n" in out
    assert "export OMP_NUM_THREADS=8\n" in out  # cluster.env wins over the cpus_per_task default
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in out
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in out
    assert "if (( RESTARTS > 20 )); then" in out
    srun = out[out.index("\nsrun "):].split("\n\n")[0].replace("\\\n", " ")
    assert "--nodes=2 --ntasks=16 --ntasks-per-node=8 --cpus-per-task=16" in srun
    assert "--container-image=/lustre/containers/qwen3vl-stack.sqsh" in srun
    assert "--container-mounts=/lustre:/lustre,/home:/home" in srun and "--cpu-bind=none" in srun
    assert srun.split()[-len(H100) - 3:] == ["python", "-m", "pretrain.train", *H100]
    # 30B-A3B's token budget in steps at 256 x 8192 tokens per step
    assert "(( LATEST_STEP < 476838 ))" in out
    assert "16 ranks (2 node(s) x 8), dp=2" in out
    assert re.search(r"^#   GPU memory: \d+\.\d of 80 GB \(cluster.gpu_memory_gb of example_h100\): fits$", out, re.M)
    assert not logs.exists()  # a dry run writes nothing
    assert "init_from=runs/s0_align/checkpoints does not exist yet" in err


def test_cpu_cluster_without_container_uses_this_interpreter(tmp_path, capsys):
    import sys

    code, out, _ = dry_run(["cluster=local_slurm", "parallel=ep2", "stage.init_from=null",
                            "data.root=/data/my shards"], tmp_path, capsys)
    assert code == 0
    assert "#SBATCH --ntasks-per-node=2" in out and "--gpus-per-node" not in out
    assert "--partition" not in out and "--container" not in out
    assert f"{sys.executable} -m pretrain.train" in out
    assert "'data.root=/data/my shards'" in out  # shell-quoted, passed through unchanged


@pytest.mark.parametrize("overrides, message", [
    (["cluster.nodes=1"], "1 node(s) x 8 task(s) per node = 8 ranks do not fit the parallel layout: world size 8 "
                          "is not divisible by etp*ep*pp = 1*8*2 = 16 (smallest world size: 16)"),
    (["train.global_batch_size=3"], "train.global_batch_size=3 is not divisible by"),
    (["cluster.tasks_per_node=16"], "cluster.tasks_per_node=16 > cluster.gpus_per_node=8"),
    (["cluster.time_limit=00:05:00"], "cluster.signal_seconds_before_limit=600: must be positive and below"),
    (["cluster.time_limit=4h"], "cluster.time_limit='4h': not a SLURM time"),
    (["cluster.max_requeues=-1"], "cluster.max_requeues=-1: must be 0 or more"),
    (["cluster=local"], "cluster=local is this machine without a scheduler"),
    (["cluster.nodes=two"], "cluster.nodes: Value 'two'"),
    (["parallel.cp=3"], "stage.seq_length=8192 is not divisible by 2*cp*tp = 24"),
    (["stage=s3_long_256k", "parallel=cp8", "model=qwen3vl_8b", "cluster.nodes=1", "cluster.tasks_per_node=4"],
     "1 node(s) x 4 task(s) per node = 4 ranks do not fit the parallel layout: world size 4 is not divisible by "
     "tp*pp*cp = 1*1*8 = 8"),
])
def test_bad_layout_is_refused_before_submitting(tmp_path, capsys, monkeypatch, overrides, message):
    # An sbatch that records any call: nothing may reach it.
    calls = tmp_path / "sbatch_calls"
    _stand_in(tmp_path / "bin", "sbatch", f'echo "$@" >> {calls}; echo 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    code = submit_main(["--workdir", str(tmp_path), *H100, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("config error: ") and message in err, err
    assert not calls.exists()


def _recording_sbatch(tmp_path, monkeypatch) -> Path:
    """An sbatch on PATH that records its calls (and answers job id 1); the file it writes to."""
    calls = tmp_path / "sbatch_calls"
    _stand_in(tmp_path / "bin", "sbatch", f'echo "$@" >> {calls}; echo 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return calls


@pytest.mark.parametrize("dry", [True, False])
def test_a_job_over_the_gpu_memory_is_refused_before_submitting(tmp_path, capsys, monkeypatch, dry):
    calls = _recording_sbatch(tmp_path, monkeypatch)
    code = submit_main([*(["--dry-run"] if dry else []), "--workdir", str(tmp_path), *UNBOUNDED_H100])
    out, err = capsys.readouterr()
    assert code == 2 and not calls.exists()
    # The plan was printed; the refusal is one line naming the totals and the largest term.
    rows = dict(re.findall(r"^(?:# )?  (total|vision activations) +(\d+\.\d)", out, flags=re.M))
    assert float(rows["total"]) > 80
    assert err.count("\n") == 1 and err.startswith(
        f"config error: stage s1_pretrain: the plan needs {rows['total']} GB per GPU, more than "
        f"cluster.gpu_memory_gb=80 (largest term: vision activations, {rows['vision activations']} GB; "
        "32,768 ViT patches per sequence assumed)"), err
    assert "does NOT fit" in out


def test_force_submits_a_job_over_the_gpu_memory(tmp_path, capsys, monkeypatch):
    calls = _recording_sbatch(tmp_path, monkeypatch)
    code = submit_main(["--force", "--parsable", "--workdir", str(tmp_path), *UNBOUNDED_H100])
    out, err = capsys.readouterr()
    assert code == 0 and out == "1\n"  # --parsable: only the job id on stdout, the plan on stderr
    assert len(calls.read_text().splitlines()) == 1
    assert "warning: --force: stage s1_pretrain: the plan needs" in err and "does NOT fit" in err


def test_gpu_memory_must_be_positive(tmp_path, capsys):
    code, _, err = dry_run([*H100, "cluster.gpu_memory_gb=0"], tmp_path, capsys)
    assert code == 2 and "config error: cluster.gpu_memory_gb=0.0: must be positive" in err


@pytest.mark.parametrize("value, seconds", [
    ("30", 1800), ("10:30", 630), ("04:00:00", 14400), ("2-00", 172800), ("1-02:03", 93780), ("1-02:03:04", 93784),
])
def test_time_limit_formats(value, seconds):
    assert time_limit_seconds(value) == seconds


def test_chain_sets_run_dirs_and_init_from(tmp_path):
    jobs = chain_stage_jobs(STAGES, ["model=tiny_moe", "cluster=local_slurm", "train.run_root=/scratch/exp1",
                                     "s3_long_256k:parallel=ep2", "s0_align:stage.init_from=/ckpt/hf_import"])
    assert [j.name for j in jobs] == STAGES
    for i, job in enumerate(jobs):
        assert job.job.stage.name == STAGES[i]
        assert job.job.train.run_dir == f"/scratch/exp1/{STAGES[i]}"
        expected = "/ckpt/hf_import" if i == 0 else f"/scratch/exp1/{STAGES[i - 1]}/checkpoints"
        assert job.job.stage.init_from == expected
        assert job.job.parallel.ep == (2 if STAGES[i] == "s3_long_256k" else 1)
        assert f"stage={STAGES[i]}" in job.overrides and "model=tiny_moe" in job.overrides


@pytest.mark.parametrize("overrides, message", [
    (["stage=sft"], "--chain sets the stage of each job"),
    (["train.run_dir=/x"], "set train.run_root instead"),
    (["stage.init_from=/x"], "for the first stage write s0_align:stage.init_from=..."),
    (["s1_pretrain:stage.init_from=/x"], "--chain sets stage.init_from of this stage itself"),
    (["sft:train.seed=1"], "'sft' is not a stage of the chain"),
])
def test_chain_refuses_ambiguous_overrides(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        chain_stage_jobs(["s0_align", "s1_pretrain"], ["cluster=local_slurm", *overrides])


def test_chain_dry_run_prints_dependencies(tmp_path, capsys):
    code, out, err = dry_run(["--chain", "s0_align,s1_pretrain,sft", "--after", "77", "model=tiny_moe",
                              "parallel=ep2", "cluster=local_slurm", "train.run_root=runs/exp"], tmp_path, capsys)
    assert code == 0, err
    would_run = re.findall(r"^# would run: (.*)$", out, flags=re.M)
    assert len(would_run) == 3
    assert "--dependency=afterok:77 --kill-on-invalid-dep=yes" in would_run[0]
    assert "--dependency=afterok:<job id of s0_align>" in would_run[1]
    assert "--dependency=afterok:<job id of s1_pretrain>" in would_run[2]
    assert "stage=sft" in out and "train.run_dir=runs/exp/sft stage.init_from=runs/exp/s1_pretrain/checkpoints" in out
    assert "init_from" not in err  # --after: the previous job writes it


def test_sbatch_command():
    assert sbatch_command("/x/a.sbatch") == ["sbatch", "--parsable", "/x/a.sbatch"]
    assert sbatch_command("a.sbatch", "afterok:12") == [
        "sbatch", "--parsable", "--dependency=afterok:12", "--kill-on-invalid-dep=yes", "a.sbatch"]


# ---------------------------------------------------------------- the script's own logic, run by bash

def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def two_node_script(tmp_path) -> dict:
    """The example_h100 script (2 nodes x 8 ranks, no container) with stand-ins for scontrol and srun:
    srun records its arguments and environment, then writes the stage's final checkpoint pointer."""
    run_dir = tmp_path / "run"
    overrides = ["stage=sft", "model=tiny_moe", "parallel=ep2", "cluster=example_h100", "stage.train_steps=7",
                 "cluster.container_image=null", "cluster.env_setup=['export SETUP_DONE=1']", f"train.run_dir={run_dir}"]
    _, job = load_job(overrides)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch_script(job, overrides, workdir=tmp_path))
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "scontrol", 'if [[ "$1 $2" == "show hostnames" ]]; then echo gpu003; echo gpu004; fi')
    _stand_in(bin_dir, "srun", f'echo "$@" > {tmp_path}/srun_args; env > {tmp_path}/srun_env; '
                               f'if [[ -z "${{NO_CHECKPOINT:-}}" ]]; then mkdir -p {run_dir}/checkpoints; '
                               f'echo step_00000007 > {run_dir}/checkpoints/latest; fi')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[003-004]",
           "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "RANK": "5", "WORLD_SIZE": "9"}
    return {"script": script, "env": env, "dir": tmp_path}


def _run_script(setup: dict, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(setup["script"])], env={**setup["env"], **env}, cwd=setup["dir"],
                          capture_output=True, text=True, timeout=60)


def test_script_launches_every_rank_with_slurm_rendezvous(two_node_script):
    done = _run_script(two_node_script)
    assert done.returncode == 0, done.stderr
    d = two_node_script["dir"]
    args = (d / "srun_args").read_text().split()
    assert args[:6] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8",
                        "--cpus-per-task=16", "--cpu-bind=none"]
    assert args[6:9] == ["python", "-m", "pretrain.train"] and "stage=sft" in args
    env = dict(line.split("=", 1) for line in (d / "srun_env").read_text().splitlines() if "=" in line)
    assert env["MASTER_ADDR"] == "gpu003" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert "RANK" not in env and "WORLD_SIZE" not in env  # ranks come from SLURM_PROCID/SLURM_NTASKS
    assert env["NCCL_IB_TIMEOUT"] == "22" and env["SETUP_DONE"] == "1"
    assert "[slurm.submit] stage sft complete: step 7 of 7" in done.stdout


def test_script_refuses_an_allocation_of_another_size(two_node_script):
    done = _run_script(two_node_script, SLURM_NTASKS="8")
    assert done.returncode == 1
    assert "the allocation has 8 tasks; the layout needs 16 (2 node(s) x 8)" in done.stderr
    assert not (two_node_script["dir"] / "srun_args").exists()


def test_script_stops_after_too_many_restarts(two_node_script):
    assert _run_script(two_node_script, SLURM_RESTART_COUNT="20").returncode == 0
    done = _run_script(two_node_script, SLURM_RESTART_COUNT="21")
    assert done.returncode == 1
    assert "restarted 21 times > cluster.max_requeues=20: not running again" in done.stderr


def test_script_fails_when_the_stage_stopped_early(two_node_script):
    done = _run_script(two_node_script, NO_CHECKPOINT="1")
    assert done.returncode == 1
    assert "stage sft stopped at step none of 7" in done.stderr


def test_check_job_layout_counts_ranks():
    _, job = load_job(["cluster=example_h100", "cluster.nodes=8", "parallel=tp4_pp2_ep8", "train.global_batch_size=64"])
    layout = check_job_layout(job)
    assert (layout.world_size, layout.data_parallel_size, layout.micro_batches_per_step) == (64, 8, 8)


def _readme_submissions() -> tuple[dict, list[list[str]]]:
    """The cluster file slurm/README.md tells a user to write, and every ``python -m slurm.submit``
    command it shows (continuation lines joined), as argument lists."""
    import shlex

    import yaml

    text = (Path(__file__).resolve().parents[2] / "slurm" / "README.md").read_text()
    cluster = yaml.safe_load(re.search(r"```yaml\n(name: mycluster\n.*?)```", text, re.S).group(1))
    joined = text.replace("\\\n", " ")
    commands = [shlex.split(line)[3:] for line in joined.splitlines() if line.startswith("python -m slurm.submit ")]
    return cluster, commands


def test_the_readme_submissions_pass_the_submit_time_checks(tmp_path, capsys):
    """Each example of slurm/README.md, on the README's cluster (example_h100 with the README file's node
    count and GPU memory), is accepted: layout, global batch and the capacity plan against the GPU memory."""
    cluster, commands = _readme_submissions()
    assert len(commands) == 4 and cluster["gpu_memory_gb"] == 80
    for args in commands:
        args = [a for a in args if a != "--dry-run"]
        at = args.index("cluster=mycluster")
        args[at:at + 1] = ["cluster=example_h100", f"cluster.nodes={cluster['nodes']}",
                           f"cluster.gpu_memory_gb={cluster['gpu_memory_gb']}",
                           f"cluster.tasks_per_node={cluster['tasks_per_node']}"]
        args = [a.replace("/lustre/me", str(tmp_path)) for a in args]
        code, out, err = dry_run(args, tmp_path, capsys)
        assert code == 0, f"{' '.join(args)}: {err.strip()}"
        assert "does NOT fit" not in out


def test_directive_values_with_spaces_are_quoted(tmp_path):
    """sbatch splits an unquoted #SBATCH value at white space (a working directory with a space was
    refused: "Invalid directive"); in double quotes it is one value (checked on a real SLURM 2026-12-02)."""
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    overrides = ["model=tiny_moe", "parallel=ep2", "cluster=example_h100", "cluster.container_image=null",
                 "+cluster.extra_sbatch.comment=two words"]
    _, job = load_job(overrides)
    lines = render_sbatch_script(job, overrides, workdir=workdir).splitlines()
    assert f'#SBATCH --chdir="{workdir}"' in lines
    assert '#SBATCH --comment="two words"' in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines  # the others unquoted
    _, job = load_job([*overrides[:-1], "+cluster.extra_sbatch.comment='say \"hi\"'"])
    with pytest.raises(ValueError, match="sbatch option --comment='say \"hi\"': a double quote"):
        render_sbatch_script(job, overrides, workdir=workdir)
