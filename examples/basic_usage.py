"""The seed README's "Basic Usage" loop, end to end, on a small real model with the fake strategy.

The model learns to continue counting sequences (k, k+1, k+2, ... mod vocab); the loss falls.
Run: ``python examples/basic_usage.py`` (``--strategy fsdp`` or ``deepspeed`` under torchrun).
"""

import argparse
import tempfile

import torch

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm


def counting_batches(steps: int, batch: int, length: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        yield (start + torch.arange(length)) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", default="fake")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--micro_train_batch_size", type=int, default=8)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--actor_learning_rate", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--save_dir", default=None)
    args = parser.parse_args()

    strategy = get_strategy(args)
    strategy.setup_distributed()
    actor = strategy.prepare(tiny_causal_lm(seed=args.seed, vocab_size=32), is_rlhf=True)
    optimizer = strategy.create_optimizer(actor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def compute_loss(batch: torch.Tensor) -> torch.Tensor:
        return actor(input_ids=batch, labels=batch).loss

    losses = []
    for step, batch in enumerate(counting_batches(args.steps, args.micro_train_batch_size, 16, 32, seed=strategy.dp_rank)):
        loss = compute_loss(batch)
        strategy.backward(loss, actor, optimizer)
        strategy.optimizer_step(optimizer, actor, scheduler)
        losses.append(strategy.all_reduce(loss.item()))
        if step % 20 == 0 or step == args.steps - 1:
            strategy.print(f"micro-step {step:4d}  loss {losses[-1]:.4f}")

    save_dir = args.save_dir or tempfile.mkdtemp(prefix="lightrft-basic-")
    path = strategy.save_ckpt(actor, save_dir)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    strategy.print(f"loss: first 10 micro-steps {first:.4f} -> last 10 {last:.4f}; checkpoint {path}")
    if last >= first:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
