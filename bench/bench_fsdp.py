"""LightRFTFSDP benchmarks on CPU ranks (gloo); prints a table of ratios measured in this run.

- memory: per-rank bytes of parameters + gradients + optimizer state, 2 ranks against 1 process
  (FSDP2 shards all three, so expect about 0.5);
- step time: ``Trainer + LightRFTFSDP`` (automatic optimization, and the LightRFT manual shape) and
  the strategy without a Trainer, against a hand-written FSDP2 loop on the same model, data, AdamW
  and clipping (2 ranks; target <= 1.05). Each measured step is paired with one hand-written step
  right after it, so both see the same load on a shared machine; the ratio is the median per pair.

Usage: python bench/bench_fsdp.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=256)
MICRO, SEQ = 4, 64


def launch(nproc: int, *args: str, script: str = __file__) -> dict:
    """Run ``script --worker *args`` on ``nproc`` CPU ranks; its last ``RESULT {json}`` line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "--master_addr=127.0.0.1", script, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {args} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def batches(steps: int, rank: int):
    import torch

    gen = torch.Generator().manual_seed(rank)
    return [torch.randint(0, MODEL["vocab_size"], (MICRO, SEQ), generator=gen) for _ in range(steps)]


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def worker_memory() -> dict:
    import torch

    from lightrft_lightning import get_strategy
    from lightrft_lightning.tiny_models import tiny_causal_lm

    strategy = get_strategy({"fsdp": True, "bf16": False, "micro_train_batch_size": MICRO,
                             "train_batch_size": MICRO * int(os.environ["WORLD_SIZE"])})
    strategy.setup_distributed()
    model = strategy.prepare(tiny_causal_lm(seed=0, **MODEL))
    opt = strategy.create_optimizer(model)
    batch = batches(1, strategy.dp_rank)[0]
    strategy.backward(model(input_ids=batch, labels=batch).loss, model, opt)
    grads = [p.grad for p in model.parameters()]
    opt.step()  # optimizer state exists after a step; keep the gradients to count them
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    sizes = {"params": local_bytes(model.parameters()), "grads": local_bytes(grads), "optim": local_bytes(state)}
    sizes["total"] = sum(sizes.values())
    return {"max_rank_bytes": strategy.all_reduce(sizes, "max")}


def worker_steptime(steps: int) -> dict:
    """Paired timings: every measured step is followed by one step of the hand-written loop on the
    same batch, so both see the same machine load; returns the median per-pair ratio and the medians."""
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader

    from lightrft_lightning.strategies.fsdp import LightRFTFSDP
    from lightrft_lightning.tiny_models import tiny_causal_lm

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {"fsdp": True, "bf16": False, "micro_train_batch_size": MICRO, "train_batch_size": MICRO * world,
              "max_norm": 1.0}
    data = batches(steps, rank)

    class HandWritten:
        """The reference: fully_shard by hand, AdamW, clipping, no strategy."""

        def __init__(self) -> None:
            self.model = tiny_causal_lm(seed=0, **MODEL)
            mesh = init_device_mesh("cpu", (world,))
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

        def step(self, batch) -> float:
            start = time.perf_counter()
            self.model(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return time.perf_counter() - start

    def standalone() -> tuple[list[float], list[float]]:
        hand = HandWritten()
        strategy = LightRFTFSDP(config)
        strategy.setup_distributed()
        model = strategy.prepare(tiny_causal_lm(seed=0, **MODEL))
        opt = strategy.create_optimizer(model, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
        times, hand_times = [], []
        for batch in data:
            start = time.perf_counter()
            strategy.backward(model(input_ids=batch, labels=batch).loss, model, opt)
            strategy.optimizer_step(opt, model, None)
            times.append(time.perf_counter() - start)
            hand_times.append(hand.step(batch))
        return times, hand_times

    class PairedTimer(Callback):
        def __init__(self) -> None:
            self.hand = HandWritten()
            self.times: list[float] = []
            self.hand_times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self.start)
            self.hand_times.append(self.hand.step(batch))

    class LM(LightningModule):
        def __init__(self, lightrft_shape: bool) -> None:
            super().__init__()
            self.automatic_optimization = not lightrft_shape
            self.model = tiny_causal_lm(seed=0, **MODEL)

        def training_step(self, batch, idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            self.trainer.strategy.backward(loss, self.model, opt)
            self.trainer.strategy.optimizer_step(opt, self.model, None)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

        def train_dataloader(self):
            return DataLoader(data, batch_size=None)

    def trainer(lightrft_shape: bool) -> tuple[list[float], list[float]]:
        timer = PairedTimer()
        Trainer(accelerator="cpu", devices=world, strategy=LightRFTFSDP(config), max_steps=steps, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                gradient_clip_val=None if lightrft_shape else 1.0, callbacks=[timer],
                use_distributed_sampler=False).fit(LM(lightrft_shape))
        return timer.times, timer.hand_times

    warm = max(3, steps // 5)
    out = {}
    for key, measure in (("standalone", standalone), ("trainer", lambda: trainer(False)),
                         ("trainer_lightrft", lambda: trainer(True))):
        times, hand = measure()
        times, hand = times[warm:], hand[warm:]
        out[key] = {"pair_ratio": statistics.median(t / h for t, h in zip(times, hand)),
                    "median_ms": statistics.median(times) * 1e3, "hand_median_ms": statistics.median(hand) * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("mode", nargs="?", default=None)
    args = parser.parse_args()
    if args.worker:
        out = worker_memory() if args.mode == "memory" else worker_steptime(args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(out), flush=True)
        return
    one, two = launch(1, "memory")["max_rank_bytes"], launch(2, "memory")["max_rank_bytes"]
    times = launch(2, "--steps", str(args.steps), "steptime")
    print(f"{'measure (2 CPU ranks, gloo)':<58}{'value':>12}{'ratio':>9}")
    for key in ("params", "grads", "optim", "total"):
        print(f"{'per-rank ' + key + ' bytes, 2 ranks / 1 process':<58}{int(two[key]):>12d}{two[key] / one[key]:>9.3f}")
    print(f"{'step time (2 ranks), paired with a hand-written FSDP2 step':<58}{'ms':>12}{'ratio':>9}")
    for key, label in (("standalone", "LightRFTFSDP, no Trainer, LightRFT calls"),
                       ("trainer", "Trainer + LightRFTFSDP, automatic optimization"),
                       ("trainer_lightrft", "Trainer + LightRFTFSDP, LightRFT calls")):
        row = times[key]
        print(f"{label:<58}{row['median_ms']:>12.2f}{row['pair_ratio']:>9.3f}")
        print(f"{'  its hand-written pair':<58}{row['hand_median_ms']:>12.2f}{1.0:>9.3f}")

if __name__ == "__main__":
    main()
