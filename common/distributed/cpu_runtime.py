"""Megatron-Core on CPU: the one place that redirects Megatron-Core 0.16's hard-coded CUDA calls.

Megatron-Core assumes a GPU: it creates tensors with ``device="cuda"`` or
``device=torch.cuda.current_device()``, calls ``.cuda()``, ``pin_memory()``, ``record_stream()``,
``torch.cuda.synchronize()``, CUDA streams and events, keeps its tensor-parallel RNG streams in the CUDA
generator, and checks parameter types against ``'torch.cuda.FloatTensor'``. With
:func:`install_cpu_runtime` those calls act on the CPU instead, so the real Megatron-Core code paths
(tensor, pipeline, expert and sequence parallelism, distributed optimizer, distributed checkpointing) run
with the gloo backend on a laptop or a CI machine, one process per rank.

How (and why this way):

* Device arguments: a :class:`torch.overrides.TorchFunctionMode` sees every torch call (factory
  functions included, the mechanism ``torch.set_default_device`` itself uses) and rewrites a CUDA device
  (``"cuda"``, ``"cuda:1"``, an integer, ``torch.device("cuda")``) to the CPU. ``Tensor.cuda()``,
  ``pin_memory()`` and ``record_stream()`` become no-ops there, and ``Tensor.type()`` reports the CUDA
  type name Megatron's optimizer and gradient clipping check for (the tensor itself is unchanged).
  Torch-function modes are per thread; Megatron runs forward, backward (the CPU autograd engine runs on
  the calling thread) and its gradient hooks on the main thread, which is where this is installed.
* ``torch.cuda``: ``current_device`` returns 0 (which the mode maps to the CPU), ``synchronize`` and
  NVTX ranges do nothing, streams and events are inert stand-ins, memory statistics are zero.
* RNG: the "CUDA generator" Megatron's ``CudaRNGStatesTracker`` forks for tensor-parallel dropout and
  checkpoints is the CPU default generator, because that is the generator CPU kernels draw from. The
  tracker's fork therefore really switches the stream dropout uses per tensor-parallel rank.
* Megatron specifics: ``moe_utils.te_general_gemm`` is defined (0.16.1 raises NameError without
  transformer-engine) and ``maybe_move_tensor_to_cpu(as_numpy=True)`` returns numpy as its callers expect.
* Uneven collectives: with expert tensor parallelism (etp > 1) the MoE all-to-all dispatcher all-gathers
  its tokens over the expert-tensor-parallel group and reduce-scatters them back with a different
  number of rows per rank (``tensor_parallel.mappings._gather_along_first_dim`` /
  ``_reduce_scatter_along_first_dim`` with split sizes call ``torch.distributed.all_gather`` /
  ``reduce_scatter`` on lists of unequal tensors). NCCL accepts that, gloo does not; on gloo those two
  functions pad every piece to the longest along the first dimension, run the collective and copy the
  real rows out (exact: the padding rows are never read).

It is a no-op when CUDA is available. Call it once per process before building models; it is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from common.megatron_fixes import apply_megatron_fixes

__all__ = ["install_cpu_runtime", "cpu_runtime_active", "CudaToCpuMode"]

_CPU = torch.device("cpu")
_INSTALLED = False
_MODE: "CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    # An integer device index always means a CUDA device in torch.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(device: Any) -> Any:
    return _CPU if _is_cuda_device(device) else device


_T = torch.Tensor
_NO_OP_METHODS = {_T.cuda, _T.pin_memory}
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NO_OP_METHODS:
            return args[0]
        if func is _T.type and len(args) == 1 and not kwargs:
            # Megatron's optimizer and clip_grads accept only 'torch.cuda.*Tensor' parameter types.
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            return name if name is not None else func(*args)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if func is _T.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _cpu_if_cuda(args[1]), *args[2:])
        elif func is torch.device and args and _is_cuda_device(args[0]):
            return _CPU
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``: work on the CPU is already ordered, so waits do nothing."""

    def __init__(self, *args, **kwargs):
        self.device = _CPU

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertEvent:
    """Stand-in for ``torch.cuda.Event``; ``elapsed_time`` is 0 ms."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_DEFAULT_STREAM = _InertStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _InertStream
    cuda.Event = _InertEvent
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    cuda.empty_cache = lambda: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda device=None: 0)
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.nvtx.range_push = lambda msg: 0
    cuda.nvtx.range_pop = lambda: 0
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()

    # The CUDA generator is the CPU default generator (see the module docstring).
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        torch.default_generator.manual_seed(int(seed))

    for module in (cuda, cuda.random):
        module.get_rng_state = get_rng_state
        module.set_rng_state = set_rng_state
        module.manual_seed = manual_seed
        module.manual_seed_all = manual_seed


class _DropForkWarning(logging.Filter):
    # With the CUDA generator being the CPU generator, dropout inside a tracker fork legitimately
    # advances the "CPU" state that the fork watches; the warning is meaningless here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _replace_function(module, name: str, replacement) -> None:
    """Set ``module.name`` and every loaded Megatron module's own reference to the same function.

    Megatron modules import helpers by name (``from ..moe_utils import maybe_move_tensor_to_cpu``), so
    patching only the defining module would miss the copies already bound elsewhere.
    """
    original = getattr(module, name, None)
    setattr(module, name, replacement)
    if original is None:
        return
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron.") and getattr(mod, name, None) is original:
            setattr(mod, name, replacement)


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    # The original only converts CUDA tensors; its callers (the alltoall token dispatcher) rely on
    # getting numpy split sizes back when as_numpy=True.
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def _patch_megatron() -> None:
    # Import every module that binds these helpers by name, so _replace_function finds them all.
    import megatron.core.transformer.moe.token_dispatcher  # noqa: F401
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    _replace_function(mrandom, "_get_cuda_rng_state",
                      lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    _replace_function(mrandom, "_set_cuda_rng_state",
                      lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    logging.getLogger(mrandom.__name__).addFilter(_DropForkWarning())

    apply_megatron_fixes()  # the bugs of Megatron's path without transformer-engine, as on a GPU
    _replace_function(moe_utils, "maybe_move_tensor_to_cpu", _maybe_move_tensor_to_cpu)


def _uneven_rows(tensors: list[torch.Tensor]) -> int | None:
    """The longest first dimension when ``tensors`` differ in it only (same dtype and other dims);
    None when they all have one shape (or differ otherwise: the collective reports that itself)."""
    first = tensors[0]
    if all(t.shape == first.shape for t in tensors):
        return None
    if first.dim() == 0 or any(t.dim() != first.dim() or t.shape[1:] != first.shape[1:] or t.dtype != first.dtype
                               for t in tensors):
        return None
    return max(t.shape[0] for t in tensors)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def _on_gloo(group) -> bool:
    return dist.get_backend(group) == dist.Backend.GLOO


def _uneven_all_gather(all_gather):
    """``torch.distributed.all_gather`` that also gathers tensors of different lengths on gloo."""

    def run(tensor_list, tensor, group=None, async_op=False):
        rows = None if async_op else _uneven_rows([*tensor_list, tensor])
        if rows is None or not _on_gloo(group):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        padded = [t.new_empty((rows, *t.shape[1:])) for t in tensor_list]
        all_gather(padded, _pad_rows(tensor, rows), group=group)
        for out, got in zip(tensor_list, padded):
            out.copy_(got[: out.shape[0]])
        return None

    return run


def _uneven_reduce_scatter(reduce_scatter):
    """``torch.distributed.reduce_scatter`` that also scatters pieces of different lengths on gloo."""

    def run(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        rows = None if async_op else _uneven_rows([*input_list, output])
        if rows is None or not _on_gloo(group):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        padded = output.new_empty((rows, *output.shape[1:]))
        reduce_scatter(padded, [_pad_rows(t, rows) for t in input_list], op=op, group=group)
        output.copy_(padded[: output.shape[0]])
        return None

    return run


def _patch_uneven_collectives() -> None:
    # Megatron calls them as ``torch.distributed.all_gather(...)``: the module attribute is enough.
    dist.all_gather = _uneven_all_gather(dist.all_gather)
    dist.reduce_scatter = _uneven_reduce_scatter(dist.reduce_scatter)


def _run_backward_under_mode(engine_run_backward):
    """Keep the mode active while the autograd engine runs custom ``backward`` methods.

    ``torch.autograd.backward``/``grad`` are themselves torch functions: the mode handles them, and a
    mode is popped while it handles a call, so without this Megatron's Python ``backward`` methods
    (e.g. the all-to-all of the MoE dispatcher) would run with their CUDA device arguments unmapped.
    """

    def run(*args, **kwargs):
        if _MODE is None or _MODE in torch.overrides._get_current_function_mode_stack():
            return engine_run_backward(*args, **kwargs)
        with _MODE:
            return engine_run_backward(*args, **kwargs)

    return run


def cpu_runtime_active() -> bool:
    """True when :func:`install_cpu_runtime` redirected CUDA calls in this process."""
    return _INSTALLED


def install_cpu_runtime(force: bool = False) -> bool:
    """Make Megatron-Core's CUDA calls act on the CPU in this process; a no-op when CUDA is available.

    Returns True when the redirection is active. ``force`` installs it even with CUDA present (tests).
    """
    global _INSTALLED, _MODE
    if _INSTALLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    # GPU performance advice that means nothing on the CPU.
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)
    _patch_torch_cuda()
    _patch_megatron()
    _patch_uneven_collectives()
    # record_stream's argument parser rejects the inert stream before any torch-function dispatch.
    torch.Tensor.record_stream = lambda self, stream: None
    import torch.autograd as autograd

    autograd._engine_run_backward = _run_backward_under_mode(autograd._engine_run_backward)
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays on this thread's torch-function mode stack for the process' lifetime
    _INSTALLED = True
    return True
