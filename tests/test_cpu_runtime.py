"""The CPU runtime redirects Megatron-Core's CUDA calls (checked in a fresh process: it is global)."""

from __future__ import annotations

from tests.multirank import run_ranks


def _redirections(rank):
    import torch

    from common.distributed.cpu_runtime import cpu_runtime_active, install_cpu_runtime

    assert install_cpu_runtime() is True and cpu_runtime_active()
    assert install_cpu_runtime() is True  # idempotent
    cpu = torch.device("cpu")
    checks = {}
    checks["device_str"] = torch.empty(2, device="cuda").device == cpu
    checks["device_index"] = torch.zeros(2, device=torch.cuda.current_device()).device == cpu
    checks["device_obj"] = torch.ones(1, device=torch.device("cuda", 0)).device == cpu
    x = torch.arange(4.0)
    checks["to_cuda"] = x.to("cuda").device == cpu and x.to("cuda:0", torch.float64).dtype == torch.float64
    checks["cuda_method"] = x.cuda() is x and x.pin_memory() is x
    x.record_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
    stream.wait_stream(torch.cuda.current_stream())
    checks["event_time"] = event.elapsed_time(event) == 0.0
    checks["type_names"] = (x.type() == "torch.cuda.FloatTensor"
                            and x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
                            and x.type(torch.float64).dtype == torch.float64)
    checks["cuda_still_unavailable"] = not torch.cuda.is_available()
    return checks


def test_cuda_calls_act_on_the_cpu():
    (checks,) = run_ranks(_redirections, 1)
    assert all(checks.values()), checks


def _rng_streams(rank):
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe import moe_utils

    from common.distributed.parallel import initialize_distributed

    initialize_distributed({}, seed=5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    # A fork draws from the model-parallel stream and leaves the default stream where it was.
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        forked = torch.rand(3)
    after_fork = torch.rand(3)
    with tracker.fork():
        forked_again = torch.rand(3)
    # The tracker's states survive a save/restore round trip (what checkpoints store).
    states = tracker.get_states()
    with tracker.fork():
        a = torch.rand(2)
    tracker.set_states(states)
    with tracker.fork():
        b = torch.rand(2)
    numpy_splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3, 4]), as_numpy=True)
    return {
        "default_stream_untouched": torch.equal(after_fork, expected_default),
        "fork_differs": not torch.equal(forked, expected_default),
        "fork_advances": not torch.equal(forked, forked_again),
        "states_restore": torch.equal(a, b),
        "numpy_splits": list(numpy_splits) == [3, 4] and not torch.is_tensor(numpy_splits),
        "te_gemm_defined": moe_utils.te_general_gemm is None,
    }


def test_tensor_parallel_rng_tracker_forks_the_cpu_generator():
    (checks,) = run_ranks(_rng_streams, 1)
    assert all(checks.values()), checks


def _uneven_collectives(rank):
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    from common.distributed.parallel import initialize_distributed

    initialize_distributed({"tp": 2})
    group = parallel_state.get_tensor_model_parallel_group()
    sizes = [5, 2]  # rows per rank: what the MoE dispatcher exchanges with expert tensor parallelism

    def rows(r, n, salt):  # the tensor rank r holds, known to every rank
        return torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) * (r + 1) + salt

    # All-gather of unequal pieces (forward) and its backward, a reduce-scatter of unequal pieces.
    x = rows(rank, sizes[rank], 0.5).requires_grad_()
    gathered = gather_from_sequence_parallel_region(x, group=group, output_split_sizes=sizes)
    upstream = rows(rank, sum(sizes), 0.25)
    gathered.backward(upstream)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    expected_grad = rows(0, sum(sizes), 0.25)[mine] + rows(1, sum(sizes), 0.25)[mine]

    # Reduce-scatter of unequal pieces, one of them empty.
    empty_sizes = [0, 4]
    y = rows(rank, 4, 0.125)
    scattered = reduce_scatter_to_sequence_parallel_region(y, group=group, input_split_sizes=empty_sizes)
    expected_scatter = (rows(0, 4, 0.125) + rows(1, 4, 0.125))[sum(empty_sizes[:rank]):sum(empty_sizes[: rank + 1])]
    return {
        "gather": torch.equal(gathered, torch.cat([rows(0, 5, 0.5), rows(1, 2, 0.5)])),
        "gather_backward": torch.equal(x.grad, expected_grad),
        "reduce_scatter": scattered.shape == expected_scatter.shape and torch.equal(scattered, expected_scatter),
    }


def test_uneven_all_gather_and_reduce_scatter_on_gloo():
    """Megatron's all-gather / reduce-scatter with split sizes (the MoE dispatcher under etp > 1) are
    exact on gloo, which by itself refuses pieces of different sizes."""
    for checks in run_ranks(_uneven_collectives, 2):
        assert all(checks.values()), checks
