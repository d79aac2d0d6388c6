"""The GPU checks of tests/gpu/run_gpu_checks.sh: one entry point that runs each check in its own
subprocess with a timeout and prints one summary line per check, then the counts.

    python tests/scripts/gpu_checks.py [--out DIR]     # every check; a dry run (all SKIP) without CUDA
    python tests/scripts/gpu_checks.py CHECK DIR       # one check's body, as the runner calls it

A check's body prints ``RESULT {json}`` (its figures, peak GPU memory included) and exits non-zero
when an assertion fails. The bodies also run on CPU (gloo, DS_ACCELERATOR=cpu), which is how they
were written (except ``engine_budget``, which reads ``torch.cuda.mem_get_info``; its arithmetic is
tested on CPU in tests/test_engine_memory.py); the runner only starts them where CUDA is. Before the
first check on a CUDA machine the runner installs, without a package index, what this checkout needs and the machine lacks: the package
itself (editable) and the wheels carried in tests/gpu/wheels (see tests/gpu/README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parents[1]
WHEELS = ROOT / "tests" / "gpu" / "wheels"
BUDGET_S = 500  # the whole run, installs included: one device call may last 10 minutes
STEPS = 2


# ---------------------------------------------------------------- check bodies (one process each)
def _peak_mib() -> Optional[float]:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _report(result: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.launch import report

    report({**result, "peak_mib": _peak_mib()})


def fit(strategy: str, workdir: Path) -> None:
    """2-step tiny GRPO ``Trainer.fit`` of examples/grpo_tiny_<strategy>.yaml on one device in
    bf16-mixed, the HF rollout engine (RolloutEngineCallback) and a DCPCheckpoint every step: async
    under FSDP2 (DeepSpeed writes its own format synchronously and refuses ``async_save``)."""
    import torch

    import grpo_strategies

    ckpt = workdir / f"ckpt_{strategy}"
    callback = {"class_path": "lightrft_lightning.callbacks.DCPCheckpoint",
                "init_args": {"dirpath": str(ckpt), "every_n_train_steps": 1,
                                 "async_save": strategy == "fsdp"}}
    extra = [f"--trainer.accelerator={'gpu' if torch.cuda.is_available() else 'cpu'}",
             "--trainer.precision=bf16-mixed", "--trainer.enable_checkpointing=true",
             f"--trainer.callbacks+={json.dumps(callback)}"]
    if strategy == "deepspeed":  # the example's config says bf16: false, which a bf16 Trainer refuses
        extra.append("--trainer.strategy.init_args.bf16=true")
    started = time.monotonic()
    recorder = grpo_strategies.run(f"examples/grpo_tiny_{strategy}.yaml", world=1, steps=STEPS, extra=tuple(extra))
    losses = [s["loss/policy"] for s in recorder.steps]
    saved = sorted(p.name for p in ckpt.iterdir())
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), f"logged losses {losses}"
    assert recorder.dtypes["engine"] == "torch.bfloat16", f"engine dtype {recorder.dtypes['engine']}"
    assert f"global_step{STEPS}" in saved and (ckpt / "latest").exists(), f"checkpoint directory holds {saved}"
    _report({"fit_s": round(time.monotonic() - started, 1), "losses": losses, "dtypes": recorder.dtypes,
             "checkpoints": saved})


def fit_pretrained_zero3(workdir: Path) -> None:
    """Issue 29 risk 4 on the device: PPO on a pretrained tiny checkpoint under ``Trainer(strategy=
    "lightrft_deepspeed_stage_3", precision="bf16-mixed")``, 2 steps: the actor and the critic's backbone are
    partitioned straight from the safetensors (no whole-model ``from_pretrained`` during ``fit``), the value head
    runs in bf16 (tests/scripts/pretrained_setup.py, the CPU test's script)."""
    import torch

    import pretrained_setup
    from lightrft_lightning.tiny_models import tiny_causal_lm

    path = workdir / "pretrained"
    tiny_causal_lm(vocab_size=len(pretrained_setup.CHARS) + 3, tie_word_embeddings=True).save_pretrained(str(path))
    summary = pretrained_setup.fit(str(path), "lightrft_deepspeed_stage_3", "ppo", "meta", "bf16-mixed",
                                   accelerator="gpu" if torch.cuda.is_available() else "cpu")
    losses = [s["loss/policy"] for s in summary["steps"]]
    assert summary["meta_before_setup"] == {"actor": True, "critic": True}, summary
    assert summary["whole_model_loads"] == 0, summary
    assert summary["held"] == {"actor": 1.0, "critic": 1.0}, summary  # one rank: its partitions are whole
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), f"logged losses {losses}"
    _report({"losses": losses, "held": summary["held"], "whole_model_loads": summary["whole_model_loads"]})


def fsdp_actor(**config):
    """A standalone LightRFTFSDP (one rank per process, bf16) and its prepared tiny actor and optimizer."""
    from lightrft_lightning import get_strategy
    from lightrft_lightning.tiny_models import tiny_causal_lm

    strategy = get_strategy(dict(fsdp=True, bf16=True, train_batch_size=2, micro_train_batch_size=2,
                                 actor_learning_rate=1e-3, dist_timeout_minutes=2.0, **config))
    strategy.setup_distributed()
    actor = strategy.prepare(tiny_causal_lm(seed=0, hidden_size=128, intermediate_size=256))
    return strategy, actor, strategy.create_optimizer(actor)


def offload_clip_push(workdir: Path) -> None:
    """Issue 29 risk 1: FSDP2 with ``fsdp_cpu_offload`` clips its CPU gradients and pushes its CPU
    shards into an HF engine on the accelerator (both crashed on an NCCL-only process group). On one
    rank DTensor skips the clip norm's all-reduce, so the group's collectives on CPU tensors are
    proven directly: an all-reduce of a CPU tensor, and the push in 4 KiB buckets, whose larger
    tensors go through ``all_gather_into_tensor`` on their CPU shards (weight_sync._full_tensor)."""
    import torch
    import torch.distributed as dist

    strategy, actor, opt = fsdp_actor(fsdp_cpu_offload=True, max_norm=1e-3)  # a max_norm that clips
    probe = torch.ones(1)
    dist.all_reduce(probe)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).to(strategy.root_device)
    strategy.backward(actor(input_ids=ids, labels=ids).loss, actor, opt)
    grad_norm = math.sqrt(sum(p.grad.full_tensor().float().pow(2).sum().item() for p in actor.parameters()))
    stepped = strategy.optimizer_step(opt, actor, None)
    strategy.setup_inference_engine(None, "hf", actor, bucket_bytes=4096)  # pushes (weight_sync.push_weights)
    strategy.update_engine_weights(actor)  # and again after the step, as every training step does
    strategy.wakeup_inference_engine()
    engine = strategy.inference_engine
    full = {k: v.to(engine.dtype).cpu() for k, v in strategy.iter_full_params(actor)}
    pushed = engine.model.state_dict()
    diff = max((pushed[k].cpu() - full[k]).abs().max().item() for k in pushed)
    shard_device = str(next(actor.parameters()).device)
    assert probe.item() == dist.get_world_size(), f"all-reduce of a CPU tensor gave {probe.item()}"
    assert stepped and math.isfinite(grad_norm) and grad_norm > 1e-3, f"stepped={stepped}, grad norm {grad_norm}"
    assert shard_device == "cpu", f"offloaded shards on {shard_device}"
    assert set(pushed) <= set(full) and diff == 0, f"engine weights differ from the actor's by {diff}"
    _report({"backend": dist.get_backend(), "grad_norm_before_clip": round(grad_norm, 4), "shards": shard_device,
             "engine_device": str(engine.device), "engine_max_diff": diff})


def engine_dtype(workdir: Path) -> None:
    """Issue 29 risk 7: the HF engine the standalone path builds under FSDP bf16 is bf16 (not the fp32
    of FSDP2's master weights)."""
    strategy, actor, _ = fsdp_actor()
    engine = strategy.setup_inference_engine(None, "hf", actor)
    got = str(engine.dtype)
    _report({"engine_dtype": got, "actor_dtype": str(next(actor.parameters()).dtype)})
    assert got == "torch.bfloat16", f"engine dtype {got}, expected torch.bfloat16"


def engine_budget(workdir: Path) -> None:
    """Issue 29 risk 2, what one GPU without vLLM can check: the free memory the colocated-engine budget
    reads (``torch.cuda.mem_get_info``) sees a tensor the trainer holds and, once PyTorch's cache is
    emptied, the blocks it freed; the Adam state counted as pending before the first step is what that
    step allocates; an engine fraction larger than what is free is refused naming engine_mem_util."""
    import torch

    from lightrft_lightning.engines.memory import check_engine_fits, device_memory, pending_optimizer_bytes
    from lightrft_lightning.tiny_models import tiny_causal_lm

    start = device_memory()
    assert start is not None and 0 < start.free <= start.total, f"device memory {start}"
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB the trainer holds
    holding = device_memory()
    assert start.free - holding.free >= (1 << 30) * 0.99, f"free {start.free} -> {holding.free} with 1 GiB held"
    del held  # cached by PyTorch until device_memory empties the cache
    released = device_memory()
    assert released.free - holding.free >= (1 << 30) * 0.99, f"free {holding.free} -> {released.free} after release"
    model = tiny_causal_lm(seed=0, hidden_size=256, intermediate_size=1024).cuda()
    adam = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pending = pending_optimizer_bytes([adam])
    model(torch.tensor([[1, 2, 3]], device="cuda")).logits.sum().backward()
    before = torch.cuda.memory_allocated()
    adam.step()
    allocated = torch.cuda.memory_allocated() - before
    assert abs(allocated - pending) <= 0.01 * pending + (1 << 20), f"Adam allocated {allocated}, pending said {pending}"
    try:
        check_engine_fits(min(1.0, released.free / released.total + 0.05), released)
        raise AssertionError("an engine larger than the free memory was not refused")
    except ValueError as err:
        assert "engine_mem_util" in str(err), str(err)
    _report({"total_gib": round(start.total / 2**30, 1), "free_gib": round(released.free / 2**30, 1),
             "adam_pending_mib": round(pending / 2**20, 2), "adam_allocated_mib": round(allocated / 2**20, 2)})


BODIES: dict[str, Callable[[Path], None]] = {
    "engine_budget": engine_budget,
    "fit_fsdp": lambda workdir: fit("fsdp", workdir),
    "fit_deepspeed": lambda workdir: fit("deepspeed", workdir),
    "fit_pretrained_zero3": fit_pretrained_zero3,
    "offload_clip_push": offload_clip_push,
    "engine_dtype": engine_dtype,
}


# ---------------------------------------------------------------- the runner
@dataclass(frozen=True)
class Check:
    name: str
    timeout_s: int
    needs: tuple[str, ...] = ()  # modules that must import, else SKIP
    pytest_file: str = ""  # the check is `pytest -m gpu <file>`; else a body above

    def command(self, workdir: Path) -> list[str]:
        if self.pytest_file:
            return [sys.executable, "-m", "pytest", self.pytest_file, "-m", "gpu", "-x", "-q", "-s", "-p", "no:cacheprovider"]
        if self.name.startswith("fit_"):  # Lightning sets up its own one-process group
            return [sys.executable, str(Path(__file__)), self.name, str(workdir)]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                str(Path(__file__)), self.name, str(workdir)]


CHECKS = (
    Check("engine_dtype", 120),
    Check("engine_budget", 60),
    Check("offload_clip_push", 120),
    Check("fit_fsdp", 180, needs=("jsonargparse",)),  # the LightningCLI reads the example YAML
    Check("fit_deepspeed", 240, needs=("jsonargparse", "deepspeed")),
    Check("fit_pretrained_zero3", 180, needs=("deepspeed",)),
    Check("pytest_fsdp", 180, needs=("pytest",), pytest_file="tests/test_fsdp.py"),
    Check("pytest_lightrft_port", 120, needs=("pytest",), pytest_file="tests/test_lightrft_port.py"),
    Check("pytest_deepspeed", 420, needs=("pytest", "deepspeed"), pytest_file="tests/test_deepspeed.py"),
)


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def install_missing(log: Path) -> list[str]:
    """Install, without an index, what the checks need and this Python lacks: the checkout (editable,
    for ``lightrft_lightning.callbacks``) and, from tests/gpu/wheels, deepspeed, jsonargparse and pytest
    with their dependencies. Returns one line per install."""
    lines = []
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check"]
    wanted = {"deepspeed": "deepspeed", "jsonargparse": "jsonargparse[signatures]", "pytest": "pytest"}
    wheels = [req for module, req in wanted.items() if _missing(module) and any(WHEELS.glob(f"{module}-*.whl"))]
    steps = [("wheels " + " ".join(wheels), [*pip, "--find-links", str(WHEELS), *wheels])] if wheels else []
    probe = subprocess.run([sys.executable, "-c", "import lightrft_lightning.callbacks"], cwd="/", capture_output=True)
    if probe.returncode:
        steps.append(("lightrft-lightning (editable)", [*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)]))
    for what, cmd in steps:
        # the machine is lent for this run: a distribution's "externally managed" Python may be changed
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1"})
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        lines.append(f"SETUP install {what}: {'ok' if proc.returncode == 0 else f'failed (rc={proc.returncode}), see {log}'}")
    importlib.invalidate_caches()
    return lines


def run_in_session(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole session (torchrun's ranks, DCP's
    writer) and return it with ``returncode=None``."""
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            return subprocess.CompletedProcess(cmd, None, stdout, stderr)


def summary(check: Check, proc: subprocess.CompletedProcess) -> tuple[str, str]:
    """(PASS|FAIL, why) from a finished check's output."""
    output = proc.stdout + proc.stderr
    if check.pytest_file:
        words = (" passed", " failed", " skipped", " error")
        tail = [line for line in proc.stdout.splitlines() if any(word in line for word in words)]
        figure = tail[-1].strip("= ") if tail else "no pytest summary"
        return ("PASS" if proc.returncode == 0 and " passed" in figure and " failed" not in figure and " error" not in figure
                else "FAIL"), figure
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(results[-1][len("RESULT "):]) if results else {}
    if proc.returncode == 0 and result:
        return "PASS", ", ".join(f"{k}={v}" for k, v in result.items())
    # the first exception line (a rank's, before torchrun's ChildFailedError), else the output's end
    errors = [line for line in output.splitlines() if re.match(r"(\[rank\d+\]: )?[\w.]+(Error|Exception)\b", line)]
    figures = "".join(f", {k}={v}" for k, v in result.items())
    return "FAIL", f"rc={proc.returncode}: {(errors[0] if errors else output.strip()[-300:]).strip()[:300]}{figures}"


def run_all(out: Path) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    deadline = time.monotonic() + float(os.environ.get("GPU_CHECKS_BUDGET_S", BUDGET_S))
    cuda = torch.cuda.is_available()
    emit(f"torch {torch.__version__}, python {sys.version.split()[0]}, "
         f"{torch.cuda.get_device_name(0) if cuda else 'no CUDA device: dry run, every check skipped'}")
    if cuda:
        for line in install_missing(out / "setup.log"):
            emit(line)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS), str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "4", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cuda"}
    for check in CHECKS:
        left = deadline - time.monotonic()
        missing = [m for m in check.needs if _missing(m)]
        if not cuda:
            status, why = "SKIP", "no CUDA device (dry run)"
        elif missing:
            status, why = "SKIP", f"{', '.join(missing)} not importable; carry wheels as tests/gpu/README.md says"
        elif left < 30:
            status, why = "SKIP", f"time budget spent ({int(left)} s left)"
        else:
            workdir = out / check.name
            if not check.pytest_file:
                workdir.mkdir(exist_ok=True)
            timeout = int(min(check.timeout_s, left))
            started = time.monotonic()
            proc = run_in_session(check.command(workdir), env, timeout)
            status, why = summary(check, proc) if proc.returncode is not None else ("FAIL", f"timed out after {timeout} s")
            (out / f"{check.name}.log").write_text(f"{proc.stdout}\n--- stderr\n{proc.stderr}")
            why = f"{why}; {time.monotonic() - started:.0f} s"
        counts[status] += 1
        emit(f"CHECK {check.name}: {status} ({why})")
    emit(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return 1 if counts["FAIL"] else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in BODIES:
        import warnings

        warnings.filterwarnings("ignore")
        os.chdir(ROOT)  # the examples' data paths are relative to the repository
        BODIES[sys.argv[1]](Path(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_checks"),
                        help="where the summary and each check's log go (default: $OUT, else /tmp/gpu_checks)")
    return run_all(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
