"""Train a tiny causal LM with the LightRFT API on any backend; rank 0 writes per-step losses and the
final full weights (safetensors) so a test can compare backends, ZeRO stages and world sizes.

    torchrun --nproc_per_node=2 ds_train.py --strategy deepspeed --zero-stages 1 2 3 [--adam-offload] --out DIR
    python ds_train.py --strategy fake --out DIR        (the one-process reference)

Each run (stage, order) writes DIR/<strategy>-z<stage>-<order>/{model.safetensors,result.json}.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm

GLOBAL_MICRO = 4  # samples per micro-step over all ranks
TRAIN_BATCH = 8  # samples per optimizer step -> 2 accumulation micro-steps
MICRO_STEPS = 10
INF_AT = 4  # this micro-step's loss is multiplied by inf: its optimizer step must be skipped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="deepspeed")
    ap.add_argument("--zero-stages", type=int, nargs="+", default=[2])
    ap.add_argument("--orders", nargs="+", default=["lightrft"], choices=["lightrft", "openrlhf"])
    ap.add_argument("--adam-offload", action="store_true", help="DeepSpeedCPUAdam (JIT-builds the cpu_adam op once)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for stage in args.zero_stages:
        for order in args.orders:
            run(args.strategy, stage, order, os.path.join(args.out, f"{args.strategy}-z{stage}-{order}"), args.adam_offload)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(name: str, stage: int, order: str, out: str, adam_offload: bool = False) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = get_strategy(dict(
        strategy=name, zero_stage=stage, bf16=False, seed=0, max_norm=0.05, adam_offload=adam_offload,
        micro_train_batch_size=GLOBAL_MICRO // world, train_batch_size=TRAIN_BATCH, actor_learning_rate=5e-3,
        dist_timeout_minutes=3.0))
    strategy.setup_distributed()
    rank = strategy.dp_rank
    model = tiny_causal_lm(seed=0)
    warm = lambda step: 1.0 / (1 + step)  # noqa: E731
    if order == "lightrft":
        model = strategy.prepare(model)
        optimizer = strategy.create_optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warm)
    else:
        optimizer = strategy.create_optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warm)
        model, optimizer, scheduler = strategy.prepare((model, optimizer, scheduler))
    data = torch.randint(0, 64, (MICRO_STEPS, GLOBAL_MICRO, 12), generator=torch.Generator().manual_seed(1))
    per_rank = GLOBAL_MICRO // world
    losses, stepped, norms = [], [], []
    for step in range(MICRO_STEPS):
        ids = data[step, rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(strategy.all_reduce(loss.item(), "mean"))
        strategy.backward(loss * float("inf") if step == INF_AT else loss, model, optimizer)
        stepped.append(bool(strategy.optimizer_step(optimizer, model, scheduler)))
        if stepped[-1]:
            norms.append(strategy.stepper(model).grad_norm)  # before clipping
    state = (strategy.full_state_dict(model) if hasattr(strategy, "full_state_dict")
             else {k: v.detach().cpu() for k, v in model.state_dict().items()})  # LightRFTFake: one process
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"losses": losses, "stepped": stepped, "skipped_steps": strategy.skipped_steps, "grad_norms": norms,
                       "lr": scheduler.get_last_lr()[0]}, f)


if __name__ == "__main__":
    main()
