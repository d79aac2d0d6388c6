"""Run a multi-rank test script with torchrun and return its output (tests import this); the two ends
of the ``RESULT {json}`` line a script reports with (:func:`report`, :func:`script_result`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = SCRIPTS.parent.parent


def report(summary: dict) -> None:
    """End of a test script: rank 0 prints ``RESULT {json}``; every rank leaves the group together
    (one process without a process group just prints)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        print("RESULT " + json.dumps(summary), flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def script_result(proc: subprocess.CompletedProcess) -> dict:
    """The last ``RESULT {json}`` a script printed (empty when it printed none)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(env: dict | None = None) -> dict:
    """The environment of a test script: one thread per rank, CPU only, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), **(env or {})}


def torchrun(script: str, nproc: int = 2, *args: str, timeout: float = 300, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``tests/scripts/<script>`` on ``nproc`` CPU ranks (gloo); raise with its output on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(SCRIPTS / script), *args,
    ]
    full_env = script_env(env)
    # a new session, so that a timeout kills torchrun's ranks too instead of leaving them behind
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"{script} timed out after {timeout}s\n--- stdout\n{stdout[-6000:]}\n--- stderr\n{stderr[-6000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed (rc={proc.returncode})\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
