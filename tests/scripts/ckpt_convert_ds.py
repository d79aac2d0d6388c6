"""Write a LightRFTDeepSpeed ZeRO-3 checkpoint of a tiny model trained one step, on 2 gloo ranks,
for tests/test_convert.py. Rank 0 also writes the model's config (``OUT/config``) and the logits
of the trained model on fixed ids (``OUT/logits.pt``).

Usage: ckpt_convert_ds.py OUT
"""

import sys
from pathlib import Path

import torch

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm

IDS = torch.arange(12).view(2, 6)


def main(out: Path) -> None:
    strategy = get_strategy(dict(strategy="deepspeed", zero_stage=3, bf16=False, seed=0, micro_train_batch_size=1,
                                 train_batch_size=2, actor_learning_rate=1e-2, dist_timeout_minutes=2.0))
    strategy.setup_distributed()
    model = tiny_causal_lm(seed=0)
    if strategy.is_rank_0():
        model.config.save_pretrained(out / "config")
    optimizer = strategy.create_optimizer(model)
    model, optimizer, _ = strategy.prepare((model, optimizer, None))
    loss = model(input_ids=IDS, labels=IDS).loss
    strategy.backward(loss, model, optimizer)
    strategy.optimizer_step(optimizer, model, None)
    strategy.save_ckpt(model, str(out / "ds"))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    if strategy.is_rank_0():
        torch.save(logits, out / "logits.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
