"""Peak memory of the learner's per-token log-probs and entropies on the real model's vocabulary
(SmolLM2: 49,152 tokens): the earlier ``log_softmax`` + ``exp`` (three vocabulary-sized fp32 copies per
position) against :func:`~lightrft_lightning.algorithms.log_probs._token_log_probs` (gather minus
``logsumexp``, the entropy in chunks of positions), forward and backward, at a temperature other than 1.

Peak extra memory: the rise of the process's resident-set high-water mark over the resident set before
the call (the mark reset through /proc/self/clear_refs; glibc's mmap threshold pinned, so that freed
tensors leave the resident set). Each case runs in a fresh process.

    python bench/bench_log_probs_memory.py [--rows 1024] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def before(logits, targets, temperature, entropy):
    """The implementation this issue replaced."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1).detach() if entropy else None
    return logp, ent


def case(impl: str, rows: int, vocab: int, dtype: str) -> dict:
    from lightrft_lightning.algorithms.log_probs import _token_log_probs

    torch.manual_seed(0)
    torch.set_num_threads(2)
    fn = before if impl == "before" else _token_log_probs
    logits = (torch.randn(rows, vocab) * 3).to(getattr(torch, dtype)).requires_grad_(True)
    targets = torch.randint(vocab, (rows,))
    advantages = torch.randn(rows)
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    logp, ent = fn(logits, targets, 0.7, True)
    (-(logp * advantages).mean()).backward()
    peak = _status("VmHWM") - base
    # the numbers the two give (same seed): compared by the parent
    return {"impl": impl, "dtype": dtype, "peak_extra": peak, "logits_bytes": logits.numel() * logits.element_size(),
            "fp32_copy_bytes": rows * vocab * 4, "logp_sum": logp.double().sum().item(),
            "ent_sum": ent.double().sum().item(), "grad_sum": logits.grad.double().abs().sum().item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--case", nargs=2)
    args = parser.parse_args()
    if args.case:
        print("CASE " + json.dumps(case(args.case[0], args.rows, args.vocab, args.case[1])), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    results = []
    for dtype in ("float32", "bfloat16"):
        for impl in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--vocab", str(args.vocab),
                                  "--case", impl, dtype], capture_output=True, text=True, env=env, check=True).stdout
            results.append(json.loads(next(line for line in out.splitlines() if line.startswith("CASE "))[5:]))
    print(f"rows={args.rows} vocab={args.vocab} temperature=0.7, forward+backward with entropy")
    print(f"{'logits':9} {'impl':7} {'peak extra MB':>14} {'/ fp32 logits':>14}")
    for r in results:
        print(f"{r['dtype']:9} {r['impl']:7} {r['peak_extra'] / 2**20:14.0f} {r['peak_extra'] / r['fp32_copy_bytes']:14.2f}")
    for dtype in ("float32", "bfloat16"):
        b, a = (r for r in results if r["dtype"] == dtype)
        print(f"{dtype}: after/before peak = {a['peak_extra'] / b['peak_extra']:.2f}; rel. diff logp "
              f"{abs(a['logp_sum'] - b['logp_sum']) / abs(b['logp_sum']):.1e}, entropy "
              f"{abs(a['ent_sum'] - b['ent_sum']) / abs(b['ent_sum']):.1e}, |grad| "
              f"{abs(a['grad_sum'] - b['grad_sum']) / abs(b['grad_sum']):.1e}")


if __name__ == "__main__":
    main()
