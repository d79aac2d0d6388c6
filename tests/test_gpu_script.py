"""tests/gpu/run_gpu_checks.sh without CUDA: a dry run that skips every check with one line saying why."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
import gpu_checks  # noqa: E402

NAMES = ["engine_dtype", "engine_budget", "offload_clip_push", "fit_fsdp", "fit_deepspeed", "fit_pretrained_zero3", "pytest_fsdp",
         "pytest_lightrft_port", "pytest_deepspeed"]


def test_without_cuda_every_check_skips_with_one_line(tmp_path):
    assert [check.name for check in gpu_checks.CHECKS] == NAMES
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    started = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run_gpu_checks.sh")], cwd="/", env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 60
    lines = proc.stdout.splitlines()
    assert "no CUDA device: dry run" in lines[0]
    assert lines[1:] == [f"CHECK {name}: SKIP (no CUDA device (dry run))" for name in NAMES] + [f"0 passed, 0 failed, {len(NAMES)} skipped"]
    assert (tmp_path / "summary.txt").read_text().splitlines() == lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.txt"]  # nothing ran, nothing installed
