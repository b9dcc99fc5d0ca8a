"""HF tensors -> a rank's parameters: the split dimension under expert tensor parallelism, and HF tensors
the config has no place for."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.model import tiny_hf
from tests.multirank import run_ranks

H, I = 64, 48  # hidden size, expert width


def _te_grouped_experts_body(rank):
    """Shards of a grouped expert fc1 / fc2 whose parameters carry the attributes transformer-engine
    gives them (there is no TE on CPU): TE's GroupedLinear, built by Megatron's TEGroupedLinear with
    ``parallel_mode=None`` (explicit expert communication), marks every weight ``partition_dim = 0``,
    although fc2 is split along its input (dim 1)."""
    from common.distributed.parallel import initialize_distributed
    from model.hf_adapter import canonical_name, local_shard

    initialize_distributed({"tp": 2, "ep": 1, "etp": 2})
    torch.manual_seed(0)
    out = {}
    for local, full, shape in (
        ("decoder.layers.0.mlp.experts.linear_fc1.weight0", torch.randn(2 * I, H), (2 * I // 2, H)),
        ("decoder.layers.0.mlp.experts.linear_fc2.weight0", torch.randn(H, I), (H, I // 2)),
        # A parameter that holds the whole tensor although marked parallel: nothing to split.
        ("decoder.layers.0.mlp.experts.linear_fc2.weight1", torch.randn(H, I), (H, I)),
    ):
        param = torch.nn.Parameter(torch.empty(shape))
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 1  # as TE sets them
        out[local] = (full, local_shard(canonical_name(local), full, param))
    return out


def test_te_grouped_expert_fc2_is_split_along_its_input_whatever_partition_dim_says():
    """hf-to-mcore / compose / check_parity with --tp 2 on a MoE model raised a shape error on a GPU with
    transformer-engine: the fc2 weight was cut along TE's partition_dim (0)."""
    for rank, shards in enumerate(run_ranks(_te_grouped_experts_body, 2)):
        full, shard = shards["decoder.layers.0.mlp.experts.linear_fc1.weight0"]
        gate, up = full.chunk(2)
        assert torch.equal(shard, torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]])), rank  # [gate_r; up_r]
        full, shard = shards["decoder.layers.0.mlp.experts.linear_fc2.weight0"]
        assert torch.equal(shard, full.chunk(2, dim=1)[rank]), rank
        full, shard = shards["decoder.layers.0.mlp.experts.linear_fc2.weight1"]
        assert torch.equal(shard, full), rank


def _edit_config(hf_dir, edit) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    edit(config)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_hf_to_mcore_refuses_tensors_its_config_has_no_place_for(tmp_path):
    """A config.json edited to fewer layers made hf-to-mcore drop the other layers' tensors silently."""
    from common.distributed.spawn import user_error_message
    from model.convert import hf_to_mcore

    src = tiny_hf.save_reference("dense", tmp_path / "hf", seed=1)

    def fewer_layers(config):
        config["text_config"]["num_hidden_layers"] = 3  # the weights have 4 decoder layers ...
        config["vision_config"].update(depth=2, deepstack_visual_indexes=[0, 1])  # ... 3 ViT blocks, 3 mergers

    _edit_config(src, fewer_layers)
    with pytest.raises(Exception) as info:
        hf_to_mcore(src, tmp_path / "mcore")
    message = user_error_message(info.value)  # what the command prints: a user error, one line
    assert message is not None, info.value
    assert "tensor(s) have no place in the model its config.json describes: " \
           "model.language_model.layers.3.input_layernorm.weight, " in message, message
    assert "does config.json belong to these weights?" in message and "\n" not in message
    assert not (tmp_path / "mcore").exists()


def _pp2_body(rank, hf_dir):
    from common.distributed.parallel import initialize_distributed
    from model.config import Qwen3VLConfig
    from model.hf_adapter import HFCheckpointReader, load_hf_weights, refuse_unused_tensors
    from model.qwen3vl import build_qwen3vl

    initialize_distributed({"pp": 2})
    reader = HFCheckpointReader(hf_dir)
    cfg = Qwen3VLConfig.from_hf(reader.config_dict)
    load_hf_weights(build_qwen3vl(cfg), reader)
    read_here = len(reader.read)
    try:
        refuse_unused_tensors(reader, cfg)
        return read_here, None
    except ValueError as exc:
        return read_here, str(exc)


def test_every_rank_reads_its_part_and_a_tied_lm_head_may_be_left(tmp_path):
    """With pp=2 each stage reads only its tensors: the check counts what all ranks read. A tied
    checkpoint that also stores lm_head.weight (some published ones do) converts; a tensor of no
    Qwen3-VL part does not."""
    src = tiny_hf.save_reference("dense", tmp_path / "hf", seed=1)  # tied embeddings: no lm_head stored
    tensors = load_file(str(src / "model.safetensors"))
    total = len(tensors)
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    results = run_ranks(_pp2_body, 2, src)
    assert all(read < total for read, _ in results)  # neither stage alone reads every tensor
    assert [error for _, error in results] == [None, None]

    tensors["model.visual.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    errors = [error for _, error in run_ranks(_pp2_body, 2, src)]
    assert errors[0] == errors[1] and errors[0].endswith(
        "1 tensor(s) have no place in the model its config.json describes: model.visual.extra.weight; "
        "does config.json belong to these weights?"), errors
