"""Parallel layout validation and launcher environments (no processes started)."""

from __future__ import annotations

import pytest

from common.distributed.parallel import ParallelConfig, ParallelConfigError, cuda_device_index, process_info


@pytest.mark.parametrize("layout, world, message", [
    ({"tp": 2, "pp": 2}, 6, "world size 6 is not divisible by tp*pp*cp = 2*2*1 = 4"),
    ({"ep": 4}, 2, "world size 2 is not divisible by etp*ep*pp = 1*4*1 = 4"),
    ({"tp": 2, "ep": 2}, 4, "parallel.ep=2 with parallel.tp=2 needs parallel.sequence_parallel=true"),
    ({"sequence_parallel": True}, 2, "needs parallel.tp >= 2"),
    ({"vpp": 2}, 2, "parallel.vpp=2 needs parallel.pp >= 2"),
    ({"pp": 2, "vpp": 1}, 2, "parallel.vpp=1 must be an integer >= 2"),
    ({"tp": 0}, 2, "parallel.tp=0 must be a positive integer"),
])
def test_bad_layouts_name_the_values(layout, world, message):
    with pytest.raises(ParallelConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
        ParallelConfig(**layout).data_parallel_size(world)


def test_good_layouts_give_data_parallel_size():
    assert ParallelConfig(tp=2).data_parallel_size(8) == 4
    assert ParallelConfig(tp=2, pp=2, ep=4, etp=1, sequence_parallel=True).data_parallel_size(16) == 4
    assert ParallelConfig(tp=4, pp=2, ep=8, etp=1, sequence_parallel=True).min_world_size() == 16


def test_a_moe_model_needs_sequence_parallelism_with_tensor_parallelism():
    """Megatron-Core's MoE layer raises at the first training forward with tp > 1 and no sequence
    parallelism, whatever ep is (moe_layer.py); tp=2 with ep=1 passed the layout checks (the planner
    planned it) and failed only after the job had started."""
    with pytest.raises(ParallelConfigError, match=r"parallel\.tp=2 with a MoE model needs "
                                                  r"parallel\.sequence_parallel=true"):
        ParallelConfig(tp=2).validate(moe=True)
    ParallelConfig(tp=2).validate()  # a dense model trains tensor-parallel without it
    ParallelConfig(tp=2, sequence_parallel=True).validate(moe=True)
    ParallelConfig(ep=2).validate(moe=True)


def test_unknown_option_is_rejected():
    with pytest.raises(ParallelConfigError, match=r"unknown parallel option\(s\) \['tpp'\]"):
        ParallelConfig.from_mapping({"tpp": 2})


def test_torchrun_environment():
    info = process_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port,
            info.launcher) == (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_environment_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is expanded by us
    info = process_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu-[003-005,9],login1", "SLURM_JOB_ID": "4242"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.launcher) == (
        5, 16, 1, "gpu-003", "slurm")
    assert info.master_port == 20000 + 4242


def test_single_process_without_launcher():
    info = process_info({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")
    assert 0 < info.master_port < 65536


def test_cuda_device_of_a_rank():
    """torchrun and a plain srun show every rank all of the node's GPUs; ``srun --gpus-per-task=1`` or
    ``--gpu-bind`` show each rank its own GPU only, as device 0: set_device(local rank) failed there
    ("invalid device ordinal") on every rank but the first of a node."""
    assert cuda_device_index(3, 8) == 3
    assert cuda_device_index(3, 1) == 0
    with pytest.raises(ParallelConfigError, match="local rank 3 has no GPU: this process sees 2"):
        cuda_device_index(3, 2)
