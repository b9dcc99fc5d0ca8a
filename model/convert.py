"""Checkpoint conversion between the Hugging Face Qwen3-VL layout and Megatron distributed checkpoints.

    python -m model.convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N --etp N]
    python -m model.convert mcore-to-hf --ckpt DIR --out DIR

``hf-to-mcore`` builds our model in the given layout (it starts ``lcm(tp*pp, etp*ep*pp)`` ranks itself,
one process each, so every rank reads and holds only its shard), copies the HF tensors into it exactly
(:mod:`model.hf_adapter`) and saves a Megatron-Core distributed checkpoint (``torch_dist``), which any
other layout can load. The checkpoint keeps the parameters' dtype of the HF checkpoint. Next to it:
``qwen3vl_config.json`` (the HF config, unchanged), ``qwen3vl_convert.json`` (dtype, source) and
``hf_extra/`` (the source's other files: tokenizer, processor and generation configs).

``mcore-to-hf`` loads such a checkpoint (whatever layout wrote it) in one process and writes
``config.json`` + safetensors in the published layout (MoE experts as ``(E, H, 2I)`` / ``(E, I, H)``).
It holds the whole model in CPU memory once.

HF -> Megatron -> HF is bit-exact. Outputs are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from model.config import Qwen3VLConfig

CONFIG_FILE = "qwen3vl_config.json"
META_FILE = "qwen3vl_convert.json"
EXTRA_DIR = "hf_extra"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _hf_to_mcore_rank(rank: int, hf_dir: str, tmp_out: str, layout: dict, dtype: str) -> None:
    import torch.distributed as dist

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import save_weights
    from model.hf_adapter import HFCheckpointReader, load_hf_weights
    from model.qwen3vl import build_qwen3vl

    initialize_distributed(layout)
    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)
    model = build_qwen3vl(cfg, params_dtype=_DTYPES[dtype], sequence_parallel=layout["sequence_parallel"])
    load_hf_weights(model, reader, progress=rank == 0)
    save_weights(tmp_out, [model])
    dist.barrier()


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1, ep: int = 1,
                etp: int | None = None) -> Path:
    """Convert an HF checkpoint directory into a Megatron distributed checkpoint at ``out_dir``."""
    from common.distributed.parallel import ParallelConfig
    from common.distributed.spawn import spawn_ranks
    from model.hf_adapter import HFCheckpointReader

    hf_dir, out = Path(hf_dir).resolve(), Path(out_dir).resolve()
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)  # validates the config before starting ranks
    dtypes = reader.dtypes()
    if len(dtypes) != 1:
        raise ValueError(f"{hf_dir}: tensors of several dtypes {sorted(map(str, dtypes))}; a bit-exact "
                         "conversion needs one")
    dtype = _dtype_name(dtypes.pop())
    layout = {"tp": tp, "pp": pp, "ep": ep, "etp": etp, "sequence_parallel": tp > 1 and ep > 1}
    # Refused here, before starting ranks that would each fail on it.
    parallel = ParallelConfig(**layout)
    parallel.validate()
    cfg.check_layout(tp, ep, etp)
    world = parallel.min_world_size()
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        spawn_ranks(_hf_to_mcore_rank, world, str(hf_dir), str(tmp), layout, dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(reader.config_dict, indent=2) + "\n")
        (tmp / META_FILE).write_text(json.dumps({
            "dtype": dtype, "source": str(hf_dir), "written_in_layout": layout, "world_size": world,
        }, indent=2) + "\n")
        extra = tmp / EXTRA_DIR
        extra.mkdir()
        for f in hf_dir.iterdir():
            if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, extra / f.name)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def load_mcore_checkpoint(ckpt_dir: str | os.PathLike, model) -> None:
    """Load a distributed checkpoint into ``model`` (built in any layout, in the initialised state)."""
    from model.checkpoint_io import load_weights

    load_weights(ckpt_dir, [model])


def read_checkpoint_config(ckpt_dir: str | os.PathLike) -> tuple[Qwen3VLConfig, torch.dtype]:
    ckpt = Path(ckpt_dir)
    for name in (CONFIG_FILE, META_FILE):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{ckpt}: no {name} (was it written by `model.convert hf-to-mcore`?)")
    cfg = Qwen3VLConfig.from_hf(json.loads((ckpt / CONFIG_FILE).read_text()))
    dtype = _DTYPES[json.loads((ckpt / META_FILE).read_text())["dtype"]]
    return cfg, dtype


def mcore_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a distributed checkpoint back to the HF layout: one written by :func:`hf_to_mcore`, or a
    training checkpoint of ``pretrain.train`` (a step folder, or a run's ``checkpoints`` folder for
    its newest step), which carries the same config files."""
    from model.hf_adapter import export_hf_tensors, write_hf_checkpoint
    from model.qwen3vl import build_qwen3vl
    from common.distributed.parallel import destroy_distributed, initialize_distributed
    from common.distributed.spawn import free_port
    from model.checkpoint_io import resolve_checkpoint

    # A training run's checkpoints folder (or its 'latest') means its newest step.
    ckpt, out = (resolve_checkpoint(ckpt_dir) or Path(ckpt_dir)).resolve(), Path(out_dir).resolve()
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    cfg, dtype = read_checkpoint_config(ckpt)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":
        raise ValueError("mcore-to-hf runs as one process; do not launch it with torchrun")
    env["MASTER_PORT"] = str(free_port())
    initialize_distributed({"tp": 1}, environ=env)
    try:
        model = build_qwen3vl(cfg, params_dtype=dtype)
        load_mcore_checkpoint(ckpt, model)
        write_hf_checkpoint(out, export_hf_tensors(model), cfg.to_hf(), extra_dir=ckpt / EXTRA_DIR)
    finally:
        destroy_distributed()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron distributed checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1)
    a.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: tp)")
    b = sub.add_parser("mcore-to-hf", help="Megatron distributed checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from common.distributed.spawn import call_reporting_user_errors

    if args.command == "hf-to-mcore":
        out = call_reporting_user_errors(hf_to_mcore, args.hf, args.out, args.tp, args.pp, args.ep, args.etp)
    else:
        out = call_reporting_user_errors(mcore_to_hf, args.ckpt, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
