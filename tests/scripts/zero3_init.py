"""LightRFT's ``init_model_context()`` under ZeRO-3 (issue 29, risk 4): a Hugging Face model loaded
inside it is partitioned as it is built (each rank holds about 1/world of the weights, never the whole
model), and once prepared it computes the logits of the same model loaded whole, then trains a step.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/zero3_init.py DIR
(tests/scripts/ds_suite.py runs ``check`` in its launch)
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import report


def check(path: str) -> dict:
    from transformers import AutoModelForCausalLM

    strategy = get_strategy({"strategy": "deepspeed", "zero_stage": 3, "bf16": False, "micro_train_batch_size": 1,
                             "train_batch_size": 2, "seed": 0})
    strategy.setup_distributed()
    if dist.get_rank() == 0:
        tiny_causal_lm(seed=3, num_hidden_layers=2).save_pretrained(path)
    dist.barrier()
    with strategy.init_model_context():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    full = sum(p.ds_numel for p in model.parameters())
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    held = sum(p.data.numel() for p in model.parameters())  # what the module itself holds: nothing
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = whole(ids).logits
    ref = strategy.prepare(model)
    with torch.no_grad():
        got = ref(ids).logits
    diff = (got - expected).abs().max().item()

    with strategy.init_model_context():
        trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trained, optimizer, _ = strategy.prepare((trained, torch.optim.AdamW(trained.parameters(), lr=1e-2), None))
    rows = ids[dist.get_rank():dist.get_rank() + 1]
    loss = trained(input_ids=rows, labels=rows).loss
    strategy.backward(loss, trained, optimizer)
    strategy.optimizer_step(optimizer, trained, None)
    with torch.no_grad():
        after = trained(input_ids=rows, labels=rows).loss
    return {"full": full, "local": local, "held": held, "max_diff": diff, "loss": loss.item(), "after": after.item()}


if __name__ == "__main__":
    report(check(sys.argv[1]))
