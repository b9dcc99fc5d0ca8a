"""Distributed checkpoints: atomic, keep-last-k, resumable exactly, loadable in another layout."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from tests.multirank import run_ranks


def _setup(layout, seed=7, cfg_name="TINY_MOE", dist_opt=True):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from common.distributed.parallel import initialize_distributed
    from pretrain.step import setup_optimizer, wrap_with_ddp
    from tests import tiny_gpt

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_distributed(layout)
    module = tiny_gpt.build(getattr(tiny_gpt, cfg_name), sequence_parallel=layout.get("sequence_parallel", False),
                            seed=seed, for_training=True)
    model = wrap_with_ddp([module], DistributedDataParallelConfig(use_distributed_optimizer=dist_opt))
    optimizer = setup_optimizer(model, OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=dist_opt,
        params_dtype=torch.float32))
    return model, optimizer


def _steps(model, optimizer, n, dp_rank, start):
    from pretrain.step import train_step
    from tests import tiny_gpt

    losses = []
    for i in range(start, start + n):
        batches = [tiny_gpt.fixed_batch(batch=1, seed=1000 * i + 10 * dp_rank + j) for j in range(2)]
        r = train_step(model, optimizer, tiny_gpt.forward_step, iter(batches), num_microbatches=2,
                       seq_length=tiny_gpt.SEQ, micro_batch_size=1)
        losses.append(r.loss)
    return losses


def _resume_body(rank, run_dir):
    """8 straight steps vs 4 steps + checkpoint + fresh model/optimizer + restore + 4 steps."""
    from megatron.core import parallel_state

    from pretrain.checkpoint import CheckpointManager, TrainerState, collect_rng_state, restore_rng_state

    layout = {"ep": 2}
    model, optimizer = _setup(layout)
    dp_rank = parallel_state.get_data_parallel_rank()
    straight = _steps(model, optimizer, 8, dp_rank, 0)

    model, optimizer = _setup(layout)
    first = _steps(model, optimizer, 4, dp_rank, 0)
    manager = CheckpointManager(run_dir, keep_last=2)
    for step in (2, 3, 4):  # older ones are pruned
        manager.save(model, optimizer, TrainerState(step=step, consumed_samples=4 * step),
                     {"rng": collect_rng_state(), "data": {"next": 4}})
    model, optimizer = _setup(layout, seed=123)  # different initial weights: the load must overwrite
    state, rank_state = manager.load(manager.latest(), model, optimizer)
    restore_rng_state(rank_state["rng"])
    second = _steps(model, optimizer, 4, dp_rank, rank_state["data"]["next"])
    return straight, first + second, state.step, sorted(os.listdir(manager.root))


def test_resume_continues_exactly(tmp_path):
    results = run_ranks(_resume_body, 2, tmp_path / "run")
    for straight, resumed, step, listing in results:
        assert step == 4
        assert resumed == straight  # bit-identical losses: weights and Adam moments restored
        assert listing == ["latest", "step_00000003", "step_00000004"]
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000004"


def _layout_change_body(rank, run_dir, cfg_name, layouts):
    """Save model+optimizer in layouts[0]; load in each layout: the next two steps are the same."""
    from megatron.core import parallel_state

    from pretrain.checkpoint import CheckpointManager, TrainerState

    manager = CheckpointManager(run_dir)
    model, optimizer = _setup(layouts[0], cfg_name=cfg_name)
    _steps(model, optimizer, 3, parallel_state.get_data_parallel_rank(), 0)
    # Both ranks hold data-parallel rank 0 (layouts[0] is tensor-parallel): the first of them saves stream 0.
    manager.save(model, optimizer, TrainerState(step=3), {}, data_states={0: {"saved_by": rank}})
    # The same global batch of the next step, split over however many data-parallel ranks exist.
    results = []
    for layout in layouts:
        model, optimizer = _setup(layout, seed=5, cfg_name=cfg_name)
        state, rank_state = manager.load(manager.latest(), model, optimizer)
        from pretrain.step import train_step
        from tests import tiny_gpt

        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        seqs = [tiny_gpt.fixed_batch(batch=1, seed=77 + j) for j in range(4)]
        mine = seqs[dp_rank * (4 // dp):(dp_rank + 1) * (4 // dp)]
        losses = []
        for _ in range(2):  # the second loss depends on the restored Adam moments
            r = train_step(model, optimizer, tiny_gpt.forward_step, iter(mine), num_microbatches=len(mine),
                           seq_length=tiny_gpt.SEQ, micro_batch_size=1)
            losses.append(r.loss)
        results.append((layout, losses, rank_state is not None, manager.load_data_states(manager.latest(), [0])))
    return results


@pytest.mark.parametrize("cfg_name, layouts", [
    ("TINY_MOE", [{"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}, {"ep": 2}]),
    ("TINY_DENSE", [{"tp": 2}, {"pp": 2}, {"tp": 1}]),
])
def test_checkpoint_loads_in_other_layouts(tmp_path, cfg_name, layouts):
    results = run_ranks(_layout_change_body, 2, tmp_path / "run", cfg_name, layouts)
    for per_rank in results:
        reference = per_rank[0][1]
        for layout, losses, restored_rank_state, data_states in per_rank:
            assert losses == pytest.approx(reference, rel=1e-5), layout
            assert data_states == {0: {"saved_by": 0}}, layout  # in every layout
        # Per-rank state (RNG) only comes back in the layout it was saved in.
        assert [r for *_, r, _ in per_rank] == [True] + [False] * (len(layouts) - 1)


def _ep_kind_change_body(rank, run_dir):
    from model.checkpoint_io import load_weights
    from pretrain.checkpoint import CheckpointError, CheckpointManager, TrainerState

    manager = CheckpointManager(run_dir)
    model, optimizer = _setup({"ep": 2})
    manager.save(model, optimizer, TrainerState(step=1), {})
    model, optimizer = _setup({"tp": 1}, seed=5)
    try:
        manager.load(manager.latest(), model, optimizer)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    load_weights(manager.root, model)  # the weights still load (a stage's init_from)
    return message


def test_moe_optimizer_state_between_ep1_and_ep2_is_a_clear_error(tmp_path):
    messages = run_ranks(_ep_kind_change_body, 2, tmp_path / "run")
    assert all("load the weights alone with stage.init_from" in m for m in messages)


def _crash_body(rank, run_dir):
    """A save killed half-way leaves the previous checkpoint as 'latest' and no final-named debris."""
    from pretrain import checkpoint as ck

    model, optimizer = _setup({"tp": 1})
    manager = ck.CheckpointManager(run_dir)
    manager.save(model, optimizer, ck.TrainerState(step=1), {})
    original = ck._write_atomic

    def crash_on_trainer_json(path, text):
        if path.name == "trainer.json":
            raise RuntimeError("simulated crash")
        original(path, text)

    ck._write_atomic = crash_on_trainer_json
    crashed = False
    try:
        manager.save(model, optimizer, ck.TrainerState(step=2), {})
    except RuntimeError:
        crashed = True
    return crashed, manager.latest().name if rank == 0 else None


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    (crashed, latest), = run_ranks(_crash_body, 1, tmp_path / "run")
    assert crashed and latest == "step_00000001"
    names = sorted(os.listdir(tmp_path / "run/checkpoints"))
    assert names == ["latest", "step_00000001", "step_00000002.tmp"]


def _switch_optimizer_kind_body(rank, run_dir, saved_dist_opt):
    import json

    from pretrain.checkpoint import CheckpointError, CheckpointManager, TrainerState

    manager = CheckpointManager(run_dir)
    model, optimizer = _setup({"tp": 1}, cfg_name="TINY_DENSE", dist_opt=saved_dist_opt)
    manager.save(model, optimizer, TrainerState(step=1), {})
    model, optimizer = _setup({"tp": 1}, seed=5, cfg_name="TINY_DENSE", dist_opt=not saved_dist_opt)
    try:
        manager.load(manager.latest(), model, optimizer)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    meta = manager.latest() / "trainer.json"
    state = json.loads(meta.read_text())
    recorded = state.pop("use_distributed_optimizer")
    if saved_dist_opt:  # (the plain optimizer's own resume is another matter)
        # A checkpoint written before the setting was recorded resumes unchecked.
        meta.write_text(json.dumps(state))
        model, optimizer = _setup({"tp": 1}, seed=5, cfg_name="TINY_DENSE", dist_opt=True)
        manager.load(manager.latest(), model, optimizer)
    return message, recorded


@pytest.mark.parametrize("saved_dist_opt", [True, False])
def test_switching_the_distributed_optimizer_at_resume_is_a_clear_error(tmp_path, saved_dist_opt):
    """Resuming after changing train.use_distributed_optimizer failed in Megatron's loader with a
    KeyError or a CheckpointingException that did not say why."""
    (message, recorded), = run_ranks(_switch_optimizer_kind_body, 1, tmp_path / "run", saved_dist_opt)
    saved, now = str(saved_dist_opt).lower(), str(not saved_dist_opt).lower()
    assert recorded is saved_dist_opt
    assert message == (f"{tmp_path / 'run/checkpoints/step_00000001'}: its optimizer state was saved with "
                       f"train.use_distributed_optimizer={saved}, this run has {now}; resume with the setting it "
                       "was saved with, or load the weights alone with stage.init_from instead.")


def _orphan_body(rank, run_dir):
    """keep_last=1. A save killed between renaming step_200 into place and rewriting 'latest' leaves
    step_200 complete but unnamed; a save killed earlier leaves step_130.tmp. The resumed run (from step
    100) saves step 150."""
    from pretrain import checkpoint as ck

    model, optimizer = _setup({"tp": 1}, cfg_name="TINY_DENSE")
    manager = ck.CheckpointManager(run_dir, keep_last=1)
    manager.save(model, optimizer, ck.TrainerState(step=100), {})
    original = ck._write_atomic
    for step, killed_at in ((200, ck.LATEST), (130, "trainer.json")):
        def killed(path, text, killed_at=killed_at):
            if path.name == killed_at:
                raise KeyboardInterrupt(f"killed before writing {killed_at}")
            original(path, text)

        ck._write_atomic = killed
        try:
            manager.save(model, optimizer, ck.TrainerState(step=step), {})
        except KeyboardInterrupt:
            pass
        ck._write_atomic = original
    resumed_from = manager.latest().name
    listing = sorted(os.listdir(manager.root))
    manager.save(model, optimizer, ck.TrainerState(step=150), {})
    return resumed_from, listing, sorted(os.listdir(manager.root)), manager.latest().name


def test_pruning_keeps_the_latest_step_and_removes_orphans_and_crashed_saves(tmp_path):
    """Pruning by name kept the orphan step_200 and removed step_150 right after 'latest' named it: the
    next resume found no checkpoint."""
    resumed_from, before, after, latest = run_ranks(_orphan_body, 1, tmp_path / "run")[0]
    assert resumed_from == "step_00000100"
    assert before == ["latest", "step_00000100", "step_00000130.tmp", "step_00000200"]
    assert after == ["latest", "step_00000150"] and latest == "step_00000150"


def _config_change_body(rank, ckpt_root):
    import json

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import CONFIG_FILE
    from model.config import Qwen3VLConfig
    from model.qwen3vl import build_qwen3vl
    from pretrain.checkpoint import CheckpointError, CheckpointManager, TrainerState
    from tests.model import tiny_hf

    initialize_distributed({})
    hf = dict(tiny_hf.MOE, model_type="qwen3_vl_moe")
    cfg = Qwen3VLConfig.from_hf(hf)
    manager = CheckpointManager(ckpt_root)

    def describe(folder):  # as pretrain.trainer.checkpoint_description writes it
        (folder / CONFIG_FILE).write_text(json.dumps(cfg.to_hf()))

    manager.save([build_qwen3vl(cfg)], None, TrainerState(step=1), {}, describe=describe)
    other = Qwen3VLConfig.from_hf(dict(hf, text_config=dict(hf["text_config"], num_experts_per_tok=3)))
    try:
        manager.load(manager.latest(), [build_qwen3vl(other)], None)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    manager.load(manager.latest(), [build_qwen3vl(cfg)], None)  # the same architecture resumes
    return message


def test_resume_into_another_architecture_is_refused(tmp_path):
    """Routing to 3 of 4 experts instead of 2 changes no shape: the resume loaded without a word."""
    message, = run_ranks(_config_change_body, 1, tmp_path / "run")
    assert message == (f"checkpoint {tmp_path / 'run/checkpoints/step_00000001'} was written for a different "
                       "model (checkpoint vs this model): text.num_experts_per_tok 2 vs 3")


def test_optimizer_state_placeholders_only_for_torch_adam(monkeypatch):
    """Before a load, torch's Adam (no TE, no apex) gets the per-parameter state Megatron's loader
    expects (step, exp_avg, exp_avg_sq); with TE's or apex's fused Adam Megatron keeps ``step`` in the
    parameter groups and allocates the state itself, and a per-parameter ``step`` would make its loader
    look for one in the checkpoint (KeyError at resume): nothing is added there."""
    from types import SimpleNamespace

    from megatron.core.optimizer import distrib_optimizer

    from pretrain.checkpoint import _materialize_optimizer_state

    for fused, expected in ((False, {"step", "exp_avg", "exp_avg_sq"}), (True, set())):
        monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", fused)
        param = torch.nn.Parameter(torch.ones(3))
        adam = torch.optim.Adam([param])
        _materialize_optimizer_state(SimpleNamespace(optimizer=adam))
        assert set(adam.state[param]) == expected, fused


def _decoder_norm_keys_body(rank):
    from common.distributed.parallel import initialize_distributed
    from model.config import Qwen3VLConfig
    from model.qwen3vl import build_qwen3vl
    from tests.model import tiny_hf

    initialize_distributed({})
    cfg = Qwen3VLConfig.from_hf(dict(tiny_hf.MOE, model_type="qwen3_vl_moe"))  # layer 1 dense, 0/2/3 MoE
    model = build_qwen3vl(cfg, attention="document")
    keys = {}
    for name, sharded in model.sharded_state_dict().items():
        if name.startswith("decoder.layers.") and "layernorm" in name and "self_attention.q_" not in name \
                and "self_attention.k_" not in name:
            keys[name] = sharded.key
    return keys


def test_decoder_norms_are_saved_under_the_te_specs_names():
    """A checkpoint names each decoder norm as Megatron's TE spec does, so one written on the `document`
    backend (CPU, cp > 1) loads on `te` (a GPU with transformer-engine) and back: TE fuses the input norm
    into linear_qkv and a dense layer's pre-MLP norm into linear_fc1, and keeps an MoE layer's pre-MLP norm
    as its own module (its keys map has no entry for it). The local spec's map had filed the MoE norm
    under the fused name: an S1 checkpoint trained with TE did not load into S3 at cp > 1."""
    keys, = run_ranks(_decoder_norm_keys_body, 1)
    assert keys == {
        **{f"decoder.layers.{i}.input_layernorm.weight":
           f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight" for i in range(4)},
        "decoder.layers.1.pre_mlp_layernorm.weight": "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
        **{f"decoder.layers.{i}.pre_mlp_layernorm.weight": f"decoder.layers.{i}.pre_mlp_layernorm.weight"
           for i in (0, 2, 3)},
    }, keys


def _truncated_resume_body(rank, run_dir):
    from pretrain.checkpoint import CheckpointError, CheckpointManager, TrainerState

    manager = CheckpointManager(run_dir)
    model, optimizer = _setup({"tp": 1}, cfg_name="TINY_DENSE")
    manager.save(model, optimizer, TrainerState(step=1), {})
    shard = max(manager.latest().glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])  # a copy cut short
    try:
        manager.load(manager.latest(), model, optimizer)
    except CheckpointError as exc:
        return shard.name, str(exc)
    return shard.name, None


def test_a_truncated_checkpoint_is_a_resume_error_naming_the_file(tmp_path):
    """Resuming from a checkpoint whose shard was cut short raised torch's CheckpointException (a
    BaseException: a traceback naming no file); now the trainer's one-line checkpoint error."""
    (name, message), = run_ranks(_truncated_resume_body, 1, tmp_path / "run")
    assert message is not None and message.startswith(
        f"checkpoint {tmp_path / 'run/checkpoints/step_00000001'} is damaged: {name}: "), message
