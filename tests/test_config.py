"""The Hydra config tree composes, validates, and reports bad input clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pretrain.cli import load_job
from pretrain.config import ConfigError, check_batch_layout

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["s0_align", "s1_pretrain", "s2_long_32k", "s3_long_256k", "sft", "sft_long_256k"]
POSTTRAIN = ["distill", "distill_on_policy", "rl_sapo", "rl_grpo", "rl_gspo"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage):
    _, job = load_job([f"stage={stage}"])
    assert job.stage.name == stage
    assert job.stage.seq_length in (8192, 32768, 262144)


def test_every_stage_file_is_tested():
    assert sorted(p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml")) == sorted(STAGES + POSTTRAIN)


@pytest.mark.parametrize("stage", ["rl_sapo", "rl_grpo", "rl_gspo"])
def test_rl_stages_compose_with_their_loss(stage):
    _, job = load_job([f"stage={stage}"])
    assert job.stage.kind == "rl" and job.stage.loss["name"] == stage.removeprefix("rl_")
    assert job.stage.rl.group_size == 16 and job.stage.rl.filter.easy_fraction == 15 / 16
    assert job.stage.loss["aggregation"] == "seq-mean-token-mean"


def test_distill_stage_needs_its_teacher_and_text_data():
    with pytest.raises(ConfigError, match="stage.distill.teacher"):
        load_job(["stage=distill"])  # data=synth has its text set; the teacher is for the user to name
    with pytest.raises(ConfigError, match="no data source named 'text'"):
        load_job(["stage=distill", "data.sources=[{name: sft, path: /data/sft}]",
                  "stage.distill.teacher=runs_big/sft/checkpoints"])
    _, job = load_job(["stage=distill", "data.sources=[{name: text, path: /data/text}]",
                       "stage.distill.teacher=runs_big/sft/checkpoints"])
    assert job.stage.kind == "distill" and job.stage.trainable == ["language"]
    with pytest.raises(ConfigError, match="stage.distill.teacher"):
        load_job(["stage=distill", "data.sources=[{name: text, path: /data/text}]", "stage.distill.teacher=null"])
    _, piped = load_job(["stage=distill", "data.sources=[{name: text, path: /data/text}]", "parallel=pp2",
                         "stage.distill.teacher=runs_big/sft/checkpoints"])
    assert piped.parallel.pp == 2  # the teacher runs through the pipeline too
    with pytest.raises(ConfigError, match="the teacher runs one model chunk per pipeline rank"):
        load_job(["stage=distill", "data.sources=[{name: text, path: /data/text}]", "parallel=pp2",
                  "parallel.vpp=2", "stage.distill.teacher=runs_big/sft/checkpoints"])


def test_on_policy_distill_stage_needs_its_teacher_and_takes_no_rewards():
    with pytest.raises(ConfigError, match="stage.distill.teacher"):
        load_job(["stage=distill_on_policy"])
    _, job = load_job(["stage=distill_on_policy", "stage.distill.teacher=runs_big/sft/checkpoints"])
    assert job.stage.kind == "distill_on_policy" and job.stage.trainable == ["language"]
    with pytest.raises(ConfigError, match="stage.rewards="):
        load_job(["stage=distill_on_policy", "stage.distill.teacher=runs_big/sft/checkpoints",
                  "stage.rewards=[exact_match]"])
    with pytest.raises(ConfigError, match="parallel.cp=2"):
        load_job(["stage=distill_on_policy", "stage.distill.teacher=runs_big/sft/checkpoints", "parallel=cp2"])


def test_report_stage_settings():
    _, s0 = load_job(["stage=s0_align"])
    assert s0.stage.trainable == ["merger"] and s0.stage.seq_length == 8192
    _, s3 = load_job(["stage=s3_long_256k"])
    assert s3.stage.seq_length == 262144 and s3.stage.init_from == "runs/s2_long_32k/checkpoints"


def test_overrides_and_interpolation():
    _, job = load_job(["stage=sft", "parallel=tp2_ep2_sp", "train.global_batch_size=32",
                       "stage.optimizer.lr=1e-4"])
    assert job.parallel.tp == 2 and job.parallel.ep == 2 and job.parallel.sequence_parallel
    assert job.train.global_batch_size == 32 and job.stage.optimizer.lr == 1e-4
    assert job.train.run_dir == "runs/sft"
    assert job.data.sources[0].path == "demo_out/shards/image_text"


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tpp=2"], "Could not override 'parallel.tpp'"),
    (["+train.foo=1"], "train.foo: Key 'foo' not in 'TrainSchema'"),
    (["parallel.tp=abc"], "parallel.tp: Value 'abc' of type 'str' could not be converted to Integer"),
    (["stage=s9"], "Could not find 'stage/s9'"),
    (["stage.loss_normalization=mean"], "stage.loss_normalization='mean': must be one of"),
    (["stage.train_tokens=null"], "set exactly one of stage.train_steps and stage.train_tokens"),
    (["+stage.data_weights.books=1.0"], "stage.data_weights.books: no data source named 'books'"),
    (["parallel.cp=3"], "stage.seq_length=8192 is not divisible by 2*cp = 6"),
    (["parallel=cp2", "parallel.tp=3", "parallel.sequence_parallel=true"],
     "stage.seq_length=8192 is not divisible by 2*cp*tp = 12"),
    (["model=qwen3vl_30b_a3b", "parallel=tp2", "parallel.sequence_parallel=false"],
     "parallel.tp=2 with a MoE model needs parallel.sequence_parallel=true"),
    (["stage.recompute.granularity=most"], "stage.recompute.granularity='most': must be one of"),
    (["stage.optimizer.lr=1e-5"], "stage.optimizer.min_lr=2e-05: must be in [0, stage.optimizer.lr=1e-05]"),
    (["train.max_consecutive_skips=0"], "train.max_consecutive_skips=0: must be positive"),
    (["stage.optimizer.warmup_steps=-1"], "stage.optimizer.warmup_steps=-1: must be 0 or more"),
    # torch's Adam refused these only once the model was built, with a traceback
    (["stage.optimizer.weight_decay=-0.1"], "stage.optimizer.weight_decay=-0.1: must be 0 or more"),
    (["stage.optimizer.adam_beta2=1.5"], "stage.optimizer.adam_beta2=1.5: must be in [0, 1)"),
    (["stage.optimizer.adam_eps=-1"], "stage.optimizer.adam_eps=-1.0: must be 0 or more"),
    (["data.num_workers=-2"], "data.num_workers=-2: must be 0 or more"),
    (["stage.data_weights.image_text=-1"], "stage.data_weights.image_text=-1.0: must be 0 or more"),
    # Megatron's uniform recompute would index past a stage's last layer; its block recompute drops the
    # MoE routers' padding mask.
    (["model=qwen3vl_30b_a3b", "stage.recompute.granularity=full", "stage.recompute.num_layers=5"],
     "stage.recompute.num_layers=5: with method uniform it must divide the 48 decoder layers"),
    (["model=qwen3vl_30b_a3b", "parallel=pp2", "stage.recompute.granularity=full", "stage.recompute.num_layers=16"],
     "it must divide the 24 decoder layers of each pipeline stage (48 layers over pp * vpp = 2)"),
    (["model=qwen3vl_30b_a3b", "stage.recompute.granularity=full", "stage.recompute.method=block"],
     "stage.recompute.method=block with an MoE model"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job(overrides)


def test_batch_layout():
    _, job = load_job(["train.global_batch_size=12", "train.micro_batch_size=2"])
    assert check_batch_layout(job.train, data_parallel_size=3) == 2
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size"):
        check_batch_layout(job.train, data_parallel_size=4)
    # The interleaved pipeline schedule runs whole groups of pp micro-batches.
    assert check_batch_layout(job.train, data_parallel_size=3, pp=2, vpp=2) == 2
    with pytest.raises(ConfigError, match="parallel.vpp=2: .* a multiple of parallel.pp=2 micro-batches per step"):
        check_batch_layout(job.train, data_parallel_size=6, pp=2, vpp=2)


def test_long_context_stages_default_to_context_parallel_and_recompute():
    from pretrain.config import recompute_overrides

    for stage in ("s3_long_256k", "sft_long_256k"):
        _, job = load_job([f"stage={stage}"])
        assert job.stage.seq_length == 262144 and job.parallel.cp == 8
        assert recompute_overrides(job.stage.recompute) == {
            "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    _, job = load_job(["stage=sft_long_256k"])
    assert job.stage.init_from == "runs/sft/checkpoints"
    _, job = load_job(["stage=s3_long_256k", "parallel=cp2"])  # the command line wins
    assert job.parallel.cp == 2
    _, job = load_job(["stage=s1_pretrain"])
    assert job.parallel.cp == 1 and recompute_overrides(job.stage.recompute) == {}
    _, job = load_job(["stage.recompute.granularity=selective"])
    assert recompute_overrides(job.stage.recompute) == {"recompute_granularity": "selective"}


def test_schema_fields_no_yaml_sets_take_plain_overrides():
    """Hydra refuses ``key=value`` for a key the composed YAML lacks; a field of the schema takes it anyway
    (it has a default, and --help/README name these keys), an unknown key is still an error."""
    _, job = load_job(["stage.optimizer.weight_decay=0.05", "stage.optimizer.clip_grad=0.5",
                       "stage.optimizer.adam_beta2=0.95", "cluster.max_requeues=5", "stage.kind=lm"])
    assert (job.stage.optimizer.weight_decay, job.stage.optimizer.clip_grad, job.stage.optimizer.adam_beta2,
            job.cluster.max_requeues) == (0.05, 0.5, 0.95, 5)
    _, job = load_job(["cluster=local_slurm", "cluster.gpu_memory_gb=40"])
    assert job.cluster.gpu_memory_gb == 40
    with pytest.raises(ConfigError, match=re.escape("Could not override 'stage.optimizer.weight_dekay'")):
        load_job(["stage.optimizer.weight_dekay=0.05"])
