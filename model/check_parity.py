"""Numerical parity of our Megatron-Core Qwen3-VL with the Hugging Face reference, on an HF checkpoint.

    python -m model.check_parity --hf DIR [--tp N --pp N --ep N --etp N --cp N --sequence-parallel]
                                 [--tolerance 1e-5] [--json OUT]

Loads the HF-layout checkpoint and its ``config.json`` into our model (in the given parallel layout) and
into transformers' ``Qwen3VL(Moe)ForConditionalGeneration``, both in float32, runs a fixed set of inputs
(text only; one image; two images of different non-square sizes; a video with timestamps; an interleaved
sequence of text, images and a video), prints the max abs logit difference per input and exits 1 when
one is above the tolerance (default 1e-5, what tests/model/test_qwen3vl_parity.py asserts).

Inputs are made from the config alone (random token ids and pixels with a fixed seed), so any valid
Qwen3-VL / Qwen3-VL-MoE config works. Position ids come from :mod:`common.tokens.positions`; the reference
computes its own with ``get_rope_index``, so they are checked too.

The tool starts its ranks itself (one process each, gloo on CPU, NCCL on GPUs), ``world = lcm(tp * pp *
cp, etp * ep * pp)``; do not launch it with torchrun. With context parallelism (``--cp``) every rank holds
its chunks of each input; the logits are gathered back into sequence order before the comparison. A layout the config cannot be split over is refused
before any rank starts; user errors (there or in a rank) are one line, ``error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.config import Qwen3VLConfig


@dataclass
class ParityInput:
    """One model input (batch of one). Pixel tensors are float32 ``(patches, patch_dim)``."""

    name: str
    input_ids: torch.Tensor  # [1, s]
    mm_token_type_ids: torch.Tensor  # [1, s] 0 text, 1 image, 2 video
    position_ids: torch.Tensor  # [3, 1, s]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    def model_kwargs(self) -> dict:
        return dict(position_ids=self.position_ids, pixel_values=self.pixel_values,
                    image_grid_thw=self.image_grid_thw, pixel_values_videos=self.pixel_values_videos,
                    video_grid_thw=self.video_grid_thw)

    def to(self, device) -> "ParityInput":
        """The same input with its tensors on ``device`` (the model's: CUDA on a GPU)."""
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return ParityInput(**moved)

    def reference_kwargs(self) -> dict:
        out = dict(input_ids=self.input_ids, mm_token_type_ids=self.mm_token_type_ids)
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class _Builder:
    """Accumulates text runs and visual placeholders the way Qwen3-VL's processor lays them out."""

    def __init__(self, cfg: Qwen3VLConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        specials = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
        self.text_ids = np.array([i for i in range(min(cfg.text.vocab_size, 50_000)) if i not in specials])
        self.ids: list[int] = []
        self.types: list[int] = []
        self.images, self.videos = [], []

    def text(self, n: int):
        self.ids += self.rng.choice(self.text_ids, n).tolist()
        self.types += [0] * n

    def _frames(self, num_frames: int, h_patches: int, w_patches: int):
        from common.media.vision_inputs import patchify

        v = self.cfg.vision
        frames = self.rng.uniform(-1, 1, (num_frames, v.in_channels, h_patches * v.patch_size,
                                          w_patches * v.patch_size)).astype(np.float32)
        patches, grid = patchify(frames, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        return torch.from_numpy(patches), grid

    def image(self, h_patches: int, w_patches: int):
        patches, grid = self._frames(1, h_patches, w_patches)
        self.images.append((patches, grid))
        n = grid[0] * grid[1] * grid[2] // self.cfg.vision.spatial_merge_size**2
        self.ids += [self.cfg.vision_start_token_id] + [self.cfg.image_token_id] * n + [self.cfg.vision_end_token_id]
        self.types += [0] + [1] * n + [0]

    def video(self, num_frames: int, h_patches: int, w_patches: int):
        """Each frame group is announced by its timestamp text (``<t seconds>``: random text tokens here)."""
        patches, grid = self._frames(num_frames, h_patches, w_patches)
        self.videos.append((patches, grid))
        per_group = grid[1] * grid[2] // self.cfg.vision.spatial_merge_size**2
        for _ in range(grid[0]):
            self.text(3)  # the timestamp, e.g. "<1.5 seconds>"
            self.ids += [self.cfg.vision_start_token_id] + [self.cfg.video_token_id] * per_group + \
                [self.cfg.vision_end_token_id]
            self.types += [0] + [2] * per_group + [0]

    def build(self, name: str, pad_multiple: int) -> ParityInput:
        from common.tokens.positions import mrope_position_ids

        if len(self.ids) % pad_multiple:
            self.text(pad_multiple - len(self.ids) % pad_multiple)
        ids = torch.tensor(self.ids)[None]
        types = torch.tensor(self.types)[None]
        img_grid = torch.tensor([g for _, g in self.images]) if self.images else None
        vid_grid = torch.tensor([g for _, g in self.videos]) if self.videos else None
        pos = mrope_position_ids(types[0], img_grid, vid_grid, self.cfg.vision.spatial_merge_size)[:, None, :]
        return ParityInput(
            name=name, input_ids=ids, mm_token_type_ids=types, position_ids=pos,
            pixel_values=torch.cat([p for p, _ in self.images]) if self.images else None,
            image_grid_thw=img_grid,
            pixel_values_videos=torch.cat([p for p, _ in self.videos]) if self.videos else None,
            video_grid_thw=vid_grid,
        )


def parity_inputs(cfg: Qwen3VLConfig, seed: int = 0, pad_multiple: int = 1) -> list[ParityInput]:
    """The fixed input set; lengths are padded with text to a multiple of ``pad_multiple``."""
    m = cfg.vision.spatial_merge_size
    out = []

    def new():
        return _Builder(cfg, np.random.default_rng([seed, len(out)]))

    b = new()
    b.text(24)
    out.append(b.build("text", pad_multiple))
    b = new()
    b.text(5); b.image(2 * m, 3 * m); b.text(9)
    out.append(b.build("one_image", pad_multiple))
    b = new()
    b.text(4); b.image(2 * m, 4 * m); b.text(3); b.image(3 * m, 1 * m); b.text(6)
    out.append(b.build("two_images", pad_multiple))
    b = new()
    b.text(4); b.video(4, 2 * m, 2 * m); b.text(6)
    out.append(b.build("video", pad_multiple))
    b = new()
    b.text(3); b.image(m, 2 * m); b.text(4); b.video(4, 2 * m, m); b.text(3); b.image(2 * m, m); b.text(5)
    out.append(b.build("interleaved", pad_multiple))
    return out


# ----------------------------------------------------------------------------------------------------
# Our model, on every rank


def _layout(args) -> dict:
    sp = args.sequence_parallel or (args.tp > 1 and args.ep > 1)
    return {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "cp": args.cp, "sequence_parallel": sp}


def world_size_for(tp: int, pp: int, ep: int, etp: int | None, cp: int = 1) -> int:
    """The ranks the tool starts: the smallest world size the layout runs on."""
    from common.distributed.parallel import ParallelConfig

    return ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, cp=cp).min_world_size()


def pad_multiple(layout: dict) -> int:
    """Input lengths the layout splits: 2*cp chunks (context parallel), each over tp ranks with SP."""
    multiple = 2 * layout.get("cp", 1) if layout.get("cp", 1) > 1 else 1
    return multiple * (layout["tp"] if layout["sequence_parallel"] else 1)


def check_layout(cfg: Qwen3VLConfig, layout: dict) -> None:
    """Refuse a layout that cannot run (``ParallelConfigError``) or that the architecture cannot be split
    over (``ConfigError``) before starting ranks that would each fail on it."""
    from common.distributed.parallel import ParallelConfig

    ParallelConfig(**layout).validate()
    cfg.check_layout(layout["tp"], layout["ep"], layout["etp"], layout["pp"])


def run_ours(hf_dir: str, layout: dict, inputs: list[ParityInput]) -> dict[str, torch.Tensor] | None:
    """Logits ``[1, s, vocab]`` per input from our model in ``layout``; returned on the rank that holds
    the last pipeline stage with tensor/data-parallel rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from common.distributed.parallel import initialize_distributed
    from model.context_parallel import gather_on_this_rank
    from model.hf_adapter import HFCheckpointReader, load_hf_weights
    from model.qwen3vl import build_qwen3vl

    initialize_distributed(layout)
    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)
    model = build_qwen3vl(cfg, sequence_parallel=layout["sequence_parallel"], parallel_output=False)
    load_hf_weights(model, reader)
    model.eval()

    device = next(model.parameters()).device

    def forward_step(data_iterator, module):
        x = next(data_iterator).to(device)
        logits = module(x.input_ids, **x.model_kwargs())
        # This rank's tokens under context parallelism: put the sequence back together.
        return logits, lambda out: (out.sum() * 0.0, {"logits": gather_on_this_rank(out.detach(), 1)})

    results = {}
    with torch.no_grad():
        for x in inputs:
            store = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([x]), model=[model], num_microbatches=1,
                seq_length=x.input_ids.shape[1], micro_batch_size=1, forward_only=True)
            if ps.is_pipeline_last_stage():
                results[x.name] = store[0]["logits"].float().cpu()
    keeper = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
              and ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0)
    return results if keeper else None


def _worker(rank: int, hf_dir: str, layout: dict, seed: int) -> dict[str, torch.Tensor] | None:
    cfg = Qwen3VLConfig.from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    inputs = parity_inputs(cfg, seed, pad_multiple=pad_multiple(layout))
    logits = run_ours(hf_dir, layout, inputs)
    import torch.distributed as dist

    dist.barrier()
    return logits


# ----------------------------------------------------------------------------------------------------
# The reference and the comparison


def reference_logits(hf_dir: str, inputs: list[ParityInput]) -> dict[str, torch.Tensor]:
    import transformers

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    cls = (transformers.Qwen3VLMoeForConditionalGeneration if config["model_type"] == "qwen3_vl_moe"
           else transformers.Qwen3VLForConditionalGeneration)
    ref = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for x in inputs:
            out[x.name] = ref(**x.reference_kwargs()).logits.float()
    return out


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], inputs: list[ParityInput]) -> dict:
    report = {}
    for x in inputs:
        a, b = ours[x.name], ref[x.name]
        if a.shape != b.shape:
            raise RuntimeError(f"{x.name}: our logits {tuple(a.shape)} vs reference {tuple(b.shape)}")
        report[x.name] = {"tokens": int(x.input_ids.shape[1]), "max_abs_diff": float((a - b).abs().max()),
                          "max_abs_logit": float(b.abs().max())}
    return report


def check(hf_dir: str, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
          sequence_parallel: bool = False, seed: int = 0, cp: int = 1) -> dict:
    """Run our model in the layout (in spawned rank processes) and the reference (in this process); the
    report maps each input name to its token count and max abs logit difference."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise ValueError("check_parity starts its own ranks: run it as a single process, not under torchrun")
    args = argparse.Namespace(tp=tp, pp=pp, ep=ep, etp=etp, cp=cp, sequence_parallel=sequence_parallel)
    layout = _layout(args)
    hf_dir = str(Path(hf_dir).resolve())
    cfg = Qwen3VLConfig.from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    check_layout(cfg, layout)
    inputs = parity_inputs(cfg, seed, pad_multiple=pad_multiple(layout))
    world = world_size_for(tp, pp, ep, etp, cp)
    from common.distributed.spawn import spawn_ranks

    ours = next(r for r in spawn_ranks(_worker, world, hf_dir, layout, seed) if r is not None)
    return compare(ours, reference_logits(hf_dir, inputs), inputs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.check_parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: tp)")
    p.add_argument("--cp", type=int, default=1, help="context parallel size")
    p.add_argument("--sequence-parallel", action="store_true", help="(automatic when tp > 1 and ep > 1)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs logit difference (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if not (Path(args.hf) / "config.json").is_file():
        p.error(f"--hf {args.hf}: no config.json there")
    from common.distributed.spawn import call_reporting_user_errors

    report = call_reporting_user_errors(check, args.hf, args.tp, args.pp, args.ep, args.etp,
                                        args.sequence_parallel, args.seed, args.cp)
    layout = _layout(args)
    print(f"parity of {args.hf} (float32), layout {layout}")
    diffs = [r["max_abs_diff"] for r in report.values()]
    passed = all(d <= args.tolerance for d in diffs)  # a NaN (unloaded or broken weights) fails, as it must
    worst = max(diffs, key=lambda d: math.inf if math.isnan(d) else d, default=0.0)
    for name, r in report.items():
        flag = "ok" if r["max_abs_diff"] <= args.tolerance else "FAIL"
        print(f"  {name:12s} {r['tokens']:5d} tokens  max |logit diff| {r['max_abs_diff']:.3e}  {flag}")
    print(f"worst {worst:.3e} (tolerance {args.tolerance:g})")
    if args.json:
        Path(args.json).write_text(json.dumps({"layout": layout, "inputs": report, "worst": worst}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
