"""Checkpoint conversion between the Hugging Face Qwen3-VL layout and Megatron distributed checkpoints.

    python -m model.convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N --etp N]
    python -m model.convert mcore-to-hf --ckpt DIR --out DIR
    python -m model.convert compose --llm DIR --vision DIR --model NAME|YAML --out DIR [--tp N --pp N --ep N --etp N]

``hf-to-mcore`` builds our model in the given layout (it starts ``lcm(tp*pp, etp*ep*pp)`` ranks itself,
one process each, so every rank reads and holds only its shard), copies the HF tensors into it exactly
(:mod:`model.hf_adapter`) and saves a Megatron-Core distributed checkpoint (``torch_dist``), which any
other layout can load. Every HF tensor must have its place in the model ``config.json`` describes (a tied
model's ``lm_head.weight`` aside): one that has none (a config edited to fewer layers) is an error, not
a tensor dropped. The checkpoint keeps the parameters' dtype of the HF checkpoint. Next to it:
``qwen3vl_config.json`` (the HF config, unchanged), ``qwen3vl_convert.json`` (dtype, source) and
``hf_extra/`` (the source's other files: tokenizer, processor and generation configs).

``mcore-to-hf`` loads such a checkpoint (whatever layout wrote it) in one process and writes
``config.json`` + safetensors in the published layout (MoE experts as ``(E, H, 2I)`` / ``(E, I, H)``).
It holds the whole model in CPU memory once.

``compose`` writes the same kind of checkpoint from a Qwen3 LLM and a SigLIP-2 vision encoder, the two
parents the report starts from, with fresh mergers (:mod:`model.compose`).

HF -> Megatron -> HF is bit-exact. Outputs are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from model.checkpoint_io import CONFIG_FILE, write_model_config
from model.config import Qwen3VLConfig

META_FILE = "qwen3vl_convert.json"
EXTRA_DIR = "hf_extra"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _hf_to_mcore_rank(rank: int, tmp_out: str, hf_dir: str, layout: dict, dtype: str) -> None:
    import torch.distributed as dist

    from common.distributed.parallel import initialize_distributed
    from model.checkpoint_io import save_weights
    from model.hf_adapter import HFCheckpointReader, load_hf_weights, refuse_unused_tensors
    from model.qwen3vl import build_qwen3vl

    initialize_distributed(layout)
    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)
    model = build_qwen3vl(cfg, params_dtype=_DTYPES[dtype], sequence_parallel=layout["sequence_parallel"])
    load_hf_weights(model, reader, progress=rank == 0)
    refuse_unused_tensors(reader, cfg)  # before anything is saved
    save_weights(tmp_out, [model])
    dist.barrier()


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1, ep: int = 1,
                etp: int | None = None) -> Path:
    """Convert an HF checkpoint directory into a Megatron distributed checkpoint at ``out_dir``."""
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
    layout = checked_layout(cfg, tp, pp, ep, etp)
    write_mcore_checkpoint(out, layout, _hf_to_mcore_rank, (str(hf_dir), layout, dtype), reader.config_dict,
                           {"dtype": dtype, "source": str(hf_dir)}, extra_from=hf_dir)
    return out


def checked_layout(cfg: Qwen3VLConfig, tp: int, pp: int, ep: int, etp: int | None) -> dict:
    """The layout a checkpoint is written in; raises (before any rank starts) when ``cfg`` cannot be split
    over it."""
    from common.distributed.parallel import ParallelConfig

    layout = {"tp": tp, "pp": pp, "ep": ep, "etp": etp, "sequence_parallel": tp > 1 and ep > 1}
    ParallelConfig(**layout).validate()
    cfg.check_layout(tp, ep, etp, pp)
    return layout


def write_mcore_checkpoint(out: Path, layout: dict, rank_fn, rank_args: tuple, config_dict: dict, meta: dict,
                           extra_from: Path | None = None) -> list:
    """Write a checkpoint to ``out`` atomically: the ranks of ``layout`` (started here, one process each)
    call ``rank_fn(rank, tmp_dir, *rank_args)`` and save the weights there; then ``qwen3vl_config.json``
    (``config_dict``), ``qwen3vl_convert.json`` (``meta`` plus the layout) and ``hf_extra/`` (the
    non-weight files of ``extra_from``) are added and the folder is renamed to ``out``. Nothing is left
    at ``out`` when a rank fails. Returns the ranks' results."""
    from common.distributed.parallel import ParallelConfig
    from common.distributed.spawn import spawn_ranks

    world = ParallelConfig(**layout).min_world_size()
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        results = spawn_ranks(rank_fn, world, str(tmp), *rank_args)
        write_model_config(tmp, config_dict)
        (tmp / META_FILE).write_text(json.dumps(
            {**meta, "written_in_layout": layout, "world_size": world}, indent=2) + "\n")
        extra = tmp / EXTRA_DIR
        extra.mkdir()
        for f in (extra_from.iterdir() if extra_from is not None else ()):
            if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, extra / f.name)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return results


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
    its newest step), which carries the same config files. An unusable checkpoint (a ``latest`` naming
    a missing step, a damaged file) raises ValueError naming it, a user error of the command line."""
    from model.checkpoint_io import CheckpointError

    try:
        return _mcore_to_hf(ckpt_dir, out_dir)
    except CheckpointError as exc:  # not a ValueError itself: the trainer reports it its own way
        raise ValueError(str(exc)) from None


def _mcore_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
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
        out.parent.mkdir(parents=True, exist_ok=True)  # --out may name a new folder's child; staging goes beside it
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.extra-") as staging:
            extra = exported_extra_files(ckpt / EXTRA_DIR, Path(staging))
            write_hf_checkpoint(out, export_hf_tensors(model), cfg.to_hf(), extra_dir=extra)
    finally:
        destroy_distributed()
    return out


GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # transformers' processor reads either


def hf_processor_configs() -> dict[str, dict]:
    """transformers' ``preprocessor_config.json`` and ``video_preprocessor_config.json`` of this stack's
    vision preprocessing (:class:`common.media.vision_inputs.VisionInputConfig` and
    :class:`common.media.frame_sampling.FrameSamplingConfig` defaults: the published Qwen3-VL's), for
    exports whose checkpoint came without them (``compose``, from scratch)."""
    from common.media.frame_sampling import FrameSamplingConfig
    from common.media.vision_inputs import VisionInputConfig

    v, f = VisionInputConfig(), FrameSamplingConfig()
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": list(v.image_mean), "image_std": list(v.image_std), "merge_size": v.merge_size,
              "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
              "processor_class": "Qwen3VLProcessor", "resample": 3, "rescale_factor": 1 / 255}
    return {
        "preprocessor_config.json": {**common, "image_processor_type": "Qwen2VLImageProcessor",
                                     "size": {"longest_edge": v.image_max_pixels, "shortest_edge": v.image_min_pixels}},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Qwen3VLVideoProcessor",
                                           "do_sample_frames": True, "fps": f.fps, "min_frames": f.min_frames,
                                           "max_frames": f.max_frames,
                                           "size": {"longest_edge": v.video_max_pixels,
                                                    "shortest_edge": v.video_min_pixels}},
    }


def exported_extra_files(extra: Path, staging: Path) -> Path:
    """The folder of the non-weight files an export writes next to the weights: the checkpoint's
    ``hf_extra/`` as it is when it holds what transformers' Qwen3-VL processor and ``generate`` read (a
    checkpoint from a published Qwen3-VL), else a copy of it in ``staging`` with the missing ones added
    (a stage trained from ``compose`` or from scratch): the image and video preprocessor configs
    (:func:`hf_processor_configs`), the published chat template (``chat_template.jinja``), and with a
    tokenizer, its ``tokenizer_config.json`` (end of turn ``<|im_end|>``, padding ``<|endoftext|>``) and a
    ``generation_config.json`` that stops where a chat turn ends, as the published Qwen3-VL's:
    ``eos_token_id`` [``<|im_end|>``, ``<|endoftext|>``], ``pad_token_id`` and ``bos_token_id``
    ``<|endoftext|>`` (transformers' ``generate`` otherwise knows no end token and writes up to
    ``max_new_tokens``)."""
    from common.tokens.chat_template import OFFICIAL_TEMPLATE_FILE
    from common.tokens.tokenizer import ENDOFTEXT, IM_END, TOKENIZER_FILE, Tokenizer

    def missing(name: str) -> bool:
        return not (extra / name).is_file()

    added: dict[str, str] = {name: json.dumps(config, indent=2) + "\n"
                             for name, config in hf_processor_configs().items() if missing(name)}
    if all(missing(name) for name in CHAT_TEMPLATE_FILES):
        added[CHAT_TEMPLATE_FILES[0]] = OFFICIAL_TEMPLATE_FILE.read_text(encoding="utf-8")
    if not missing(TOKENIZER_FILE):
        tokenizer = Tokenizer.from_dir(extra)
        if missing(GENERATION_CONFIG):
            added[GENERATION_CONFIG] = json.dumps(
                {"bos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                 "eos_token_id": [tokenizer.im_end_id, tokenizer.eos_id]}, indent=2) + "\n"
        if missing(TOKENIZER_CONFIG):
            added[TOKENIZER_CONFIG] = json.dumps(
                {"tokenizer_class": "Qwen2Tokenizer", "eos_token": IM_END, "pad_token": ENDOFTEXT,
                 "model_max_length": 262144, "clean_up_tokenization_spaces": False}, indent=2) + "\n"
    if not added:
        return extra
    if extra.is_dir():
        for f in extra.iterdir():
            if f.is_file():
                shutil.copy2(f, staging / f.name)
    for name, text in added.items():
        (staging / name).write_text(text, encoding="utf-8")
    return staging


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
    c = sub.add_parser("compose", help="Qwen3 LLM + SigLIP-2 vision encoder -> Megatron distributed checkpoint "
                                       "of Qwen3-VL with fresh mergers (model/compose.py)")
    c.add_argument("--llm", required=True, help="HF Qwen3 / Qwen3-MoE causal LM folder")
    c.add_argument("--vision", required=True, help="HF SigLIP-2 vision model (or whole SigLIP-2) folder")
    c.add_argument("--model", required=True, help="the target: a conf/model name or a YAML file of that form")
    c.add_argument("--out", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--ep", type=int, default=1)
    c.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: tp)")
    c.add_argument("--seed", type=int, default=1234, help="seed of the mergers' initialisation (recorded)")
    c.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: the LLM parent's")
    args = p.parse_args(argv)
    from common.distributed.spawn import call_reporting_user_errors

    if args.command == "hf-to-mcore":
        out = call_reporting_user_errors(hf_to_mcore, args.hf, args.out, args.tp, args.pp, args.ep, args.etp)
    elif args.command == "compose":
        from model.compose import compose

        report = call_reporting_user_errors(compose, args.llm, args.vision, args.out, args.model, tp=args.tp,
                                            pp=args.pp, ep=args.ep, etp=args.etp, seed=args.seed, dtype=args.dtype)
        print("\n".join(report.lines()))
        out = report.out
    else:
        out = call_reporting_user_errors(mcore_to_hf, args.ckpt, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
