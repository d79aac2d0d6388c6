"""Ulysses sequence parallelism on the real model (SmolLM2-135M-Instruct, fp32): one long sequence's
forward and backward (the learner's per-token log-probs, ``log_probs``) at ``sp_size`` 1 (one process)
and 2 (two gloo ranks, each holding half of the positions), on the same CPU cores (2 threads in all).

Per rank: the peak activation memory (the rise of the resident-set high-water mark over the resident set
before the step, with the weights and their gradients already allocated; the mark reset through
/proc/self/clear_refs and glibc's mmap threshold pinned so that freed tensors leave the resident set) and
the time per step; and the difference between the two runs' log-probs and gradients.

    python bench/bench_sp.py [--tokens 4096] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"  # the built-in name: SmolLM2-135M-Instruct from the local Hugging Face cache


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def rank_case(tokens: int, steps: int, out: str) -> None:
    """One rank's measurement (sp from the launch: the world size)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from lightrft_lightning import pretrained
    from lightrft_lightning.algorithms.log_probs import log_probs
    from lightrft_lightning.parallel import ulysses

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group("gloo")
        ulysses.set_group(ulysses.build_mesh("cpu", world, world)["sp"].get_group())
    model = AutoModelForCausalLM.from_pretrained(pretrained.resolve(MODEL), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    if world > 1:
        ulysses.enable(model)
    for p in model.parameters():  # the gradients exist before the measured steps (their memory is not activations)
        p.grad = torch.zeros_like(p)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    attn = torch.ones_like(ids)
    peaks, times = [], []
    for _ in range(steps):
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        logp, _ = log_probs(model, ids, attn)
        logp.mean().backward()
        times.append(time.perf_counter() - t0)
        peaks.append(_status("VmHWM") - base)
    grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if world > 1:
        for t in grad.values():  # what FSDP2 / DeepSpeed do: the mean over all ranks
            dist.all_reduce(t)
            t /= world
    rank = dist.get_rank() if world > 1 else 0
    result = {"rank": rank, "peak_activation_bytes": peaks, "step_s": times}
    if rank == 0:
        torch.save({"logp": logp.detach(), "grad": {n: t / steps for n, t in grad.items()}}, out)
    print("CASE " + json.dumps(result), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(sp: int, tokens: int, steps: int, out: str) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = [__file__, "--tokens", str(tokens), "--steps", str(steps), "--case", out]
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sp}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", *args] if sp > 1 else [sys.executable, *args])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"sp={sp} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return sorted((json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")),
                  key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.case:
        rank_case(args.tokens, args.steps, args.case)
        return
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_sp_{os.getpid()}"
    runs = {sp: launch(sp, args.tokens, args.steps, f"{out}_{sp}.pt") for sp in (1, 2)}
    a, b = (torch.load(f"{out}_{sp}.pt", weights_only=True) for sp in (1, 2))
    for sp in (1, 2):
        os.remove(f"{out}_{sp}.pt")
    logp_diff = float((a["logp"] - b["logp"]).abs().max())
    grad_diff = max(float((a["grad"][n] - b["grad"][n]).abs().max()) for n in a["grad"])
    print(f"{MODEL}, fp32, one sequence of {args.tokens} tokens, log-probs forward+backward, "
          f"{args.steps} steps (the last one reported); 2 CPU threads in all")
    print(f"{'sp':>3} {'rank':>5} {'peak activation MB':>19} {'s / step':>9}")
    for sp, ranks in runs.items():
        for r in ranks:
            print(f"{sp:>3} {r['rank']:>5} {r['peak_activation_bytes'][-1] / 2**20:19.0f} {r['step_s'][-1]:9.2f}")
    one, two = runs[1][0], max(runs[2], key=lambda r: r["peak_activation_bytes"][-1])
    print(f"peak activation per rank sp2/sp1 = {two['peak_activation_bytes'][-1] / one['peak_activation_bytes'][-1]:.2f}; "
          f"time per step sp2/sp1 = {two['step_s'][-1] / one['step_s'][-1]:.2f}")
    print(f"max |log-prob diff| = {logp_diff:.2e}, max |grad diff| = {grad_diff:.2e}")


if __name__ == "__main__":
    main()
