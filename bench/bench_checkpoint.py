"""DCP checkpoint throughput and async-save blocking, measured in one run on one disk.

    python bench/bench_checkpoint.py [--mb 256] [--dir /tmp/bench_ckpt]

Prints a table: DCP save and load (through lightrft_lightning.checkpoint: atomic rename, CRC-32,
fsync, verified pickle-safe load) against a plain sequential write/read of the same bytes (one file,
fsync'd), and the training time blocked by a save: synchronous ``dcp.save`` vs ``dcp.async_save``
(staging, plus waiting for the previous save at the next one) while a CPU "training step" runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from lightrft_lightning import checkpoint


def make_state(mb: int) -> dict[str, torch.Tensor]:
    per = 8 * 2**20 // 4  # 8 MB fp32 tensors
    n = max(1, mb // 8)
    g = torch.Generator().manual_seed(0)
    return {"model": {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}}


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state["model"].values())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_write(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        for t in state["model"].values():
            f.write(t.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def plain_read(state: dict, path: Path) -> None:
    with open(path, "rb") as f:
        for t in state["model"].values():
            t.copy_(torch.frombuffer(bytearray(f.read(t.numel() * 4)), dtype=torch.float32))


def drop_caches(path: Path) -> None:
    """Best effort: evict the files from the page cache so reads hit the disk (needs root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def train_step(work: torch.Tensor) -> None:
    for _ in range(4):
        work = work @ work
        work = work / work.norm()


def blocked(state: dict, root: Path, asynchronous: bool, steps_between: int, saves: int = 3) -> tuple[float, float]:
    """(seconds training was blocked by saves, total wall seconds) for ``saves`` saves."""
    work = torch.randn(384, 384)
    pending = None
    block = 0.0
    start = time.perf_counter()
    for i in range(saves):
        for _ in range(steps_between):
            for t in list(state["model"].values())[:4]:
                t.add_(1e-3)  # training mutates the weights in place after each save
            train_step(work)
        t0 = time.perf_counter()
        if pending is not None:
            pending.wait()  # the next save waits for the previous one
        pending = checkpoint.save(str(root), f"s{i}", state, {}, max_num=2, no_dist=True, async_save=asynchronous)
        block += time.perf_counter() - t0
    t0 = time.perf_counter()
    pending.wait()
    block += time.perf_counter() - t0
    return block, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="state size in MB (>= 200 for the acceptance figure)")
    parser.add_argument("--dir", default="/tmp/lightrft_bench_ckpt", help="a directory on the disk to measure")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    state = make_state(args.mb)
    size_mb = nbytes(state) / 2**20

    plain = root / "plain.bin"
    t_plain_w = timed(lambda: plain_write(state, plain))
    t_dcp_w = timed(lambda: checkpoint.save(str(root / "dcp"), "ck", state, {}, no_dist=True))
    drop_caches(root)
    t_plain_r = timed(lambda: plain_read(state, plain))
    template = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
    drop_caches(root)
    t_dcp_r = timed(lambda: checkpoint.load(str(root / "dcp" / "ck"), template))
    assert all(torch.equal(template["model"][k], v) for k, v in state["model"].items())

    # as in a real run, the training between two saves takes longer than writing one
    work = torch.randn(384, 384)
    step_s = min(timed(lambda: train_step(work)) for _ in range(3))
    steps_between = max(1, int(1.5 * t_dcp_w / step_s))
    sync_block, sync_wall = blocked(state, root / "sync", False, steps_between)
    async_block, async_wall = blocked(state, root / "async", True, steps_between)

    print(f"state: {size_mb:.0f} MB in {len(state['model'])} tensors, dir {root}")
    print(f"{'operation':<44}{'seconds':>10}{'MB/s':>10}{'vs plain':>10}")
    for name, t, base in [("plain sequential write + fsync", t_plain_w, t_plain_w),
                          ("DCP save (atomic, CRC-32, fsync)", t_dcp_w, t_plain_w),
                          ("plain sequential read", t_plain_r, t_plain_r),
                          ("DCP load (verified, weights_only)", t_dcp_r, t_plain_r)]:
        print(f"{name:<44}{t:>10.3f}{size_mb / t:>10.0f}{base / t:>10.2f}")
    print(f"\n{steps_between} training steps ({steps_between * step_s:.2f} s) between saves")
    print(f"{'':<44}{'sync s':>10}{'async s':>10}{'ratio':>10}")
    print(f"{'training blocked by 3 saves':<44}", end="")
    print(f"{sync_block:>10.3f}{async_block:>10.3f}{async_block / sync_block:>10.2f}")
    print(f"{'wall time of the 3-save loop':<44}{sync_wall:>10.3f}{async_wall:>10.3f}{async_wall / sync_wall:>10.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
