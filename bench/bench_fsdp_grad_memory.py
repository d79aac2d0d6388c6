"""Gradient memory per rank under FSDP2 gradient accumulation (2 CPU ranks, gloo, LightRFTFSDP standalone).

After each micro-step's backward of an optimizer step with ``accumulation`` micro-steps, count the bytes
of gradient this rank holds: the sharded gradients (``param.grad``, a 1/world shard each) plus any
unsharded gradients FSDP2 keeps while gradient sync is off. Prints the peak over the step per
accumulation, as bytes and as a fraction of one full fp32 gradient of the model.

Usage: python bench/bench_fsdp_grad_memory.py
"""

from __future__ import annotations

import json
import os
import sys

from bench_fsdp import launch  # same folder: run as python bench/bench_fsdp_grad_memory.py

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
MICRO, SEQ = 2, 32


def held_gradient_bytes(model) -> tuple[int, int]:
    """(sharded bytes in param.grad, unsharded bytes FSDP2 keeps aside) on this rank. Reads FSDP2's
    internal parameter records: a measurement, not package code."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = 0
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            sharded += g.numel() * g.element_size()
    unsharded = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else []:
            grad = fsdp_param.unsharded_accumulated_grad
            if grad is None and fsdp_param._unsharded_param is not None:
                grad = getattr(fsdp_param._unsharded_param, "grad", None)
            if grad is not None:
                unsharded += grad.numel() * grad.element_size()
    return sharded, unsharded


def worker(accumulation: int) -> None:
    import torch
    import torch.distributed as dist

    from lightrft_lightning import LightRFTFSDP, StrategyConfig
    from lightrft_lightning.tiny_models import tiny_causal_lm

    world = int(os.environ["WORLD_SIZE"])
    strategy = LightRFTFSDP(StrategyConfig(fsdp=True, bf16=False, micro_train_batch_size=MICRO,
                                           train_batch_size=MICRO * world * accumulation, max_norm=1.0))
    strategy.setup_distributed()
    model = tiny_causal_lm(**MODEL)
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer, _ = strategy.prepare((model, optimizer, None))
    gen = torch.Generator().manual_seed(dist.get_rank())
    peak_sharded = peak_unsharded = 0
    for _ in range(accumulation):
        ids = torch.randint(0, MODEL["vocab_size"], (MICRO, SEQ), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        strategy.backward(loss, model, optimizer)
        sharded, unsharded = held_gradient_bytes(model)
        peak_sharded, peak_unsharded = max(peak_sharded, sharded), max(peak_unsharded, unsharded)
        strategy.optimizer_step(optimizer, model, None)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"full": full_bytes, "sharded": peak_sharded, "unsharded": peak_unsharded}))
    dist.barrier()


def main() -> None:
    print(f"{'accumulation':>12} {'sharded MB':>11} {'unsharded MB':>13} {'total MB':>9} {'x full fp32 grad':>17}")
    for accumulation in (1, 4):
        r = launch(2, str(accumulation), script=__file__)
        total = r["sharded"] + r["unsharded"]
        print(f"{accumulation:>12} {r['sharded'] / 2**20:>11.1f} {r['unsharded'] / 2**20:>13.1f} "
              f"{total / 2**20:>9.1f} {total / r['full']:>17.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
    else:
        main()
