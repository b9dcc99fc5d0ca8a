"""`make demo` until the full Qwen3-VL pipeline lands: a 2-rank CPU training of a tiny Qwen3 MoE decoder.

Run under torchrun (``make demo`` does): ``torchrun --nproc-per-node 2 -m pretrain.demo``. The two gloo
ranks split the experts (expert parallel 2) and the batch (data parallel 2), with Megatron's DDP and
distributed optimizer. The task is copying: each sequence is 12 random tokens, a separator, then the
same 12 tokens; the loss counts only the copy, so a model that learned to attend back reaches ~0 loss
and 100% copy accuracy on sequences it never saw.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from model.language import Qwen3TextConfig, build_language_model
from pretrain.parallel import destroy_distributed, initialize_distributed
from pretrain.step import setup_optimizer, token_loss, train_step, wrap_with_ddp

HALF = 12
SEQ = 2 * HALF + 1
VOCAB = 64
SEPARATOR = VOCAB - 1
MODEL = Qwen3TextConfig(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0,
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
)


def copy_batch(batch_size: int, generator: torch.Generator) -> dict:
    """Sequences ``x SEP x`` (x: HALF tokens); the loss covers the second x only."""
    x = torch.randint(0, SEPARATOR, (batch_size, HALF), generator=generator)
    sep = torch.full((batch_size, 1), SEPARATOR)
    seq = torch.cat([x, sep, x, sep], dim=1)  # one extra token so inputs and labels are SEQ long
    loss_mask = torch.zeros(batch_size, SEQ)
    loss_mask[:, HALF:2 * HALF] = 1.0  # predicting tokens HALF+1 .. 2*HALF (the copy)
    return {
        "tokens": seq[:, :SEQ],
        "labels": seq[:, 1:SEQ + 1],
        "position_ids": torch.arange(SEQ).expand(batch_size, SEQ),
        "loss_mask": loss_mask,
    }


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return losses, partial(token_loss, batch["loss_mask"])


@torch.no_grad()
def copy_accuracy(model, batch: dict) -> float:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    logits = gather_from_tensor_model_parallel_region(
        model(batch["tokens"], batch["position_ids"], attention_mask=None))
    model.train()
    mask = batch["loss_mask"].bool()
    return (logits.argmax(-1)[mask] == batch["labels"][mask]).float().mean().item()


def main(steps: int = 150, micro_batch: int = 16) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    info = initialize_distributed({"ep": 2}, seed=1234)
    torch.set_num_threads(1)
    rank0 = info.rank == 0
    module = build_language_model(MODEL, MODEL.transformer_config(), max_sequence_length=SEQ)
    model = wrap_with_ddp([module], DistributedDataParallelConfig(use_distributed_optimizer=True))
    optimizer = setup_optimizer(model, OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.0, clip_grad=1.0,
        use_distributed_optimizer=True, params_dtype=torch.float32))

    dp_rank = parallel_state.get_data_parallel_rank()
    data = torch.Generator().manual_seed(100 + dp_rank)
    held_out = copy_batch(256, torch.Generator().manual_seed(999))
    before = copy_accuracy(module, held_out)
    if rank0:
        print(f"tiny Qwen3 MoE decoder: {sum(p.numel() for p in module.parameters())} parameters per rank, "
              f"{info.world_size} gloo ranks (expert parallel 2, data parallel 2, distributed optimizer)")
        print(f"{'step':>5} {'loss':>8} {'grad norm':>10} {'tokens/s':>9}")
    tokens_per_step = 2 * micro_batch * SEQ * parallel_state.get_data_parallel_world_size()
    start = time.perf_counter()
    tokens_done = 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        batches = [copy_batch(micro_batch, data) for _ in range(2)]
        result = train_step(model, optimizer, forward_step, iter(batches), num_microbatches=2,
                            seq_length=SEQ, micro_batch_size=micro_batch)
        tokens_done += tokens_per_step
        if rank0 and (step % 25 == 0 or step == 1):
            print(f"{step:>5} {result.loss:>8.4f} {result.grad_norm:>10.3f} "
                  f"{tokens_per_step / (time.perf_counter() - t0):>9.0f}")
    after = copy_accuracy(module, held_out)
    if rank0:
        print(f"done: {steps} steps, {tokens_done} tokens in {time.perf_counter() - start:.1f} s; "
              f"copy accuracy on 256 unseen sequences: {before:.1%} before -> {after:.1%} after")
    destroy_distributed()


if __name__ == "__main__":
    main()
