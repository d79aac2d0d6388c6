"""Leaving the process group at interpreter exit without the gloo abort.

The abort (``terminate called without an active exception``, SIGABRT, after a clean run) comes from
gloo's worker threads (``pt_gloo_runloop``). A worker drops its reference to a finished collective
(``AsyncWork``) a moment *after* the caller has seen it complete. When that drop releases a tensor
that Python also knows, torch must take the GIL for it. If the script has returned by then, the
interpreter is finalizing: the thread that asks for the GIL is made to exit inside the work's C++
destructor, and the process aborts. ``destroy_process_group()`` alone does not prevent it: the gloo
backend, and its worker threads, live on as long as anything references the group (an FSDP2 model
does, through its mesh), so the threads are only joined by the garbage collector during
finalization, which is too late.

Importing this module registers :func:`leave_process_group` with ``atexit``: atexit handlers run while
the interpreter still serves other threads. It releases the GIL until every gloo worker is idle
(asleep and not woken over a short interval), then destroys the process group if the script has not. It
waits even when the script destroyed the group itself (``dist.barrier(); dist.destroy_process_group()``):
the workers outlive the group, and the barrier's work may still be theirs to drop.
"""

from __future__ import annotations

import atexit
import os
import time

import torch
import torch.distributed as dist

_GLOO_WORKER = "pt_gloo_runloop"


def default_backend(device_type: str) -> str:
    """The process group backend for ranks on ``device_type``: on CUDA ``cpu:gloo,cuda:nccl``, so that
    collectives on CPU tensors (FSDP2's CPU-offloaded shards and gradients, their clip norm, weight
    pushes and EMA of offloaded models) run over gloo instead of failing on an NCCL-only group; else gloo."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def collective_device(device: torch.device) -> torch.device:
    """Where a collective over tensors on ``device`` runs in the current process group: CUDA for an
    NCCL-only group, the tensors' own device where the group serves it, else CPU."""
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and "cuda:nccl" in backend:
        return device
    return torch.device("cpu")
_TASKS = "/proc/self/task"


def _gloo_workers() -> dict[str, tuple[str, int]]:
    """``thread id -> (state, context switches)`` of this process's gloo worker threads (Linux)."""
    workers = {}
    for tid in os.listdir(_TASKS):
        try:
            with open(f"{_TASKS}/{tid}/comm") as f:
                if f.read().strip() != _GLOO_WORKER:
                    continue
            with open(f"{_TASKS}/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open(f"{_TASKS}/{tid}/status") as f:
                switches = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:  # the thread ended while we looked
            continue
        workers[tid] = (state, switches)
    return workers


def wait_for_idle_gloo_workers(interval: float = 0.005, timeout: float = 5.0) -> bool:
    """Release the GIL until every gloo worker thread is asleep and stays asleep, unwoken, for
    ``interval`` seconds: it has then dropped its last work and waits for the next. A worker still
    finishing a work is runnable, or wakes up once it gets the GIL. Returns False on ``timeout``."""
    if not os.path.isdir(_TASKS):
        return True
    deadline = time.monotonic() + timeout
    before = _gloo_workers()
    while time.monotonic() < deadline:
        time.sleep(interval)
        after = _gloo_workers()
        if after == before and all(state == "S" for state, _ in after.values()):
            return True
        before = after
    return False


def leave_process_group() -> None:
    """Wait for idle gloo workers (those of a group already destroyed too), then destroy the default process
    group (and the groups made from it) if it is still there."""
    wait_for_idle_gloo_workers()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(leave_process_group)
