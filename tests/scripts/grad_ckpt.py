"""``StrategyConfig.gradient_checkpointing`` on each strategy: one LightRFT-shape step of a tiny HF
model with and without it; the loss, the gradient norm and the stepped weights must agree (fp32), and
the bytes autograd saves for backward must fall.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/grad_ckpt.py fsdp deepspeed ...
    PYTHONPATH=. python tests/scripts/grad_ckpt.py fake
"""

from __future__ import annotations

import os
import sys

import torch

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import report

BATCH = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))


def saved_bytes(fn) -> tuple[object, int]:
    """Run ``fn`` and count the bytes of the tensors autograd saves for its backward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def step(name: str, checkpointing: bool, zero_stage: int = 2) -> dict:
    strategy = get_strategy({"strategy": name, "bf16": False, "gradient_checkpointing": checkpointing,
                             "zero_stage": zero_stage, "micro_train_batch_size": 1,
                             "train_batch_size": int(os.environ.get("WORLD_SIZE", 1)), "seed": 0})
    strategy.setup_distributed()
    model = tiny_causal_lm(seed=0, num_hidden_layers=4)
    model, optimizer, _ = strategy.prepare((model, torch.optim.SGD(model.parameters(), lr=0.1), None))
    rows = BATCH[strategy.dp_rank::strategy.dp_world_size]
    loss, nbytes = saved_bytes(lambda: model(input_ids=rows, labels=rows).loss)
    strategy.backward(loss, model, optimizer)
    strategy.optimizer_step(optimizer, model, None)
    weight = dict(strategy.full_state_dict(model)) if hasattr(strategy, "full_state_dict") else model.state_dict()
    probe = weight["model.layers.0.mlp.up_proj.weight"].float().sum().item() if weight else 0.0
    return {"loss": strategy.all_reduce(loss.item()), "grad_norm": strategy.stepper(model).grad_norm,
            "probe": probe, "saved_bytes": nbytes}


def main() -> None:
    summary = {}
    for spec in sys.argv[1:]:
        name, _, stage = spec.partition(":")
        summary[spec] = {str(flag): step(name, flag, int(stage or 2)) for flag in (False, True)}
    report(summary)

if __name__ == "__main__":
    main()
