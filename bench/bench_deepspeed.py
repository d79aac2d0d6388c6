"""LightRFTDeepSpeed benchmarks on 2 CPU ranks (gloo), measured in one run, printed as tables:

1. step time of ``Trainer + LightRFTDeepSpeed`` (manual optimization) against a hand-written
   DeepSpeed engine loop (``engine(...)``, ``engine.backward``, ``engine.step``) on the same model,
   data and DeepSpeed config, in one fit: each Trainer step is followed by one hand-written step on
   the same batch (A B A B ...), so each pair shares the machine's load; the ratio is the median
   per pair.
2. per-rank training state bytes (parameters + fp32 master copies + Adam moments) per ZeRO stage,
   against one process with torch AdamW.

    python bench/bench_deepspeed.py [--steps 100] [--stage 2]     (re-launches itself with torchrun)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def _relaunch() -> None:
    from tests.launch import free_port

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", __file__, *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env))


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and "LOCAL_RANK" not in os.environ:
    sys.path.insert(0, _ROOT)
    _relaunch()

import lightning as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed  # noqa: E402
from lightrft_lightning.tiny_models import tiny_causal_lm  # noqa: E402

MODEL = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2)
MICRO, SEQ = 4, 64


def config(stage: int) -> dict:
    return dict(zero_stage=stage, bf16=False, micro_train_batch_size=MICRO, train_batch_size=MICRO * 2,
                max_norm=1.0, actor_learning_rate=1e-4, seed=0)


def batches(steps: int) -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (steps * MICRO * 2, SEQ), generator=torch.Generator().manual_seed(0))


def hand_engine(stage: int) -> Any:
    """The reference: a DeepSpeed engine driven by hand, with the strategy's own DeepSpeed config."""
    import deepspeed

    model = tiny_causal_lm(seed=0, **MODEL)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=LightRFTDeepSpeed(config(stage)).ds_config(), dist_init_required=False)
    return engine


def hand_step(engine: Any, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start


class PairedHandStep(L.Callback):
    """Right after each Trainer step, one hand-written engine step on the same batch, so the pair
    shares the machine's load. A Trainer step is timed from one ``on_train_batch_start`` to the
    next (data loading and all of Lightning's per-step work included), less its paired hand step."""

    def __init__(self, stage: int) -> None:
        self.engine = hand_engine(stage)
        self.starts: list[float] = []
        self.hand: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, ids: torch.Tensor,
                           batch_idx: int) -> None:
        self.hand.append(hand_step(self.engine, ids))

    def pairs(self) -> list[tuple[float, float]]:
        """(Trainer step, hand step) seconds for every step but the last (which has no next start)."""
        return [(b - a - h, h) for a, b, h in zip(self.starts, self.starts[1:], self.hand)]


class Actor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = tiny_causal_lm(seed=0, **MODEL)

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> None:
        loss = self.actor(input_ids=ids, labels=ids).loss
        self.manual_backward(loss)
        self.optimizers().step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.actor.parameters(), lr=1e-4)


def paired_steps(steps: int, stage: int) -> list[tuple[float, float]]:
    data = batches(steps)
    loader = DataLoader(data, batch_size=MICRO, sampler=DistributedSampler(data, 2, dist.get_rank(), shuffle=False))
    timer = PairedHandStep(stage)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=LightRFTDeepSpeed(config(stage)), max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[timer],
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(Actor(), loader)
    return timer.pairs()


def null_pairs(steps: int, stage: int) -> list[tuple[float, float]]:
    """The method's noise floor: two identical hand-written engines paired the same way."""
    first, second, data, rank = hand_engine(stage), hand_engine(stage), batches(steps), dist.get_rank()
    starts, hand = [], []
    for step in range(steps):
        starts.append(time.perf_counter())
        ids = data[(2 * step + rank) * MICRO:(2 * step + rank + 1) * MICRO]
        hand_step(first, ids)
        hand.append(hand_step(second, ids))
    return [(b - a - h, h) for a, b, h in zip(starts, starts[1:], hand)]


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind the local parameters, the optimizer's (master) params and
    its states; ZeRO-3 parameters count their local partition (and their full data when DeepSpeed
    keeps them whole: below ``stage3_param_persistence_threshold``)."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        storage = t.untyped_storage()
        if t.numel() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for p in module.parameters():
        add(p.data)  # empty for a partitioned ZeRO-3 parameter, full for a persistent (small) one
        if hasattr(p, "ds_tensor"):
            add(p.ds_tensor)
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for p in group["params"]:
            add(p.data)
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                add(value)
    return total


def stage_bytes(stage: int) -> int:
    strategy = LightRFTDeepSpeed(config(stage))
    model = strategy.prepare(tiny_causal_lm(seed=0, **MODEL))
    optimizer = strategy.create_optimizer(model)
    ids = batches(1)[:MICRO]
    for _ in range(2):  # one real optimizer step: Adam moments exist
        strategy.backward(model(input_ids=ids, labels=ids).loss, model, optimizer)
        strategy.optimizer_step(optimizer, model, None)
    return state_bytes(model.module, model.engine.optimizer)


def one_process_bytes() -> int:
    model = tiny_causal_lm(seed=0, **MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = batches(1)[:MICRO]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return state_bytes(model, optimizer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--stage", type=int, default=2)
    args = ap.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    pairs = paired_steps(args.steps, args.stage)[args.warmup:]
    null = null_pairs(args.steps, args.stage)[args.warmup:]
    sizes = {stage: stage_bytes(stage) for stage in (1, 2, 3)}
    single = one_process_bytes() if dist.get_rank() == 0 else 0
    if dist.get_rank() == 0:
        t, h = (statistics.median(column) for column in zip(*pairs))
        ratio = statistics.median(a / b for a, b in pairs)
        print(f"\nStep time, 2 CPU ranks, ZeRO-{args.stage}, fp32, Qwen2 {MODEL['hidden_size']}x{MODEL['num_hidden_layers']}"
              f" ({sum(p.numel() for p in tiny_causal_lm(**MODEL).parameters()) / 1e6:.2f} M params), micro batch {MICRO}x{SEQ},"
              f" {len(pairs)} paired steps (median; ratio: median per pair)")
        print("| loop | step time (ms) | ratio |\n|---|---|---|")
        print(f"| hand-written DeepSpeed engine loop | {h * 1e3:.1f} | 1.000 |")
        print(f"| Trainer + LightRFTDeepSpeed | {t * 1e3:.1f} | {ratio:.3f} |")
        print(f"| hand-written loop paired with itself (noise floor) | {statistics.median(a for a, _ in null) * 1e3:.1f}"
              f" | {statistics.median(a / b for a, b in null):.3f} |")
        print("\nPer-rank training state (params + fp32 master + Adam moments; gradients, which ZeRO-2 also"
              " partitions, are transient and not counted), rank 0 of 2, vs one process")
        print("| setup | MiB | ratio |\n|---|---|---|")
        print(f"| one process, torch AdamW | {single / 2**20:.2f} | 1.000 |")
        for stage, size in sizes.items():
            print(f"| ZeRO-{stage}, 2 ranks | {size / 2**20:.2f} | {size / single:.3f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
