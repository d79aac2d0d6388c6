"""Rollouts on vLLM servers vs colocated vLLM, the real SmolLM2-135M-Instruct, fp32, one run:

1. greedy equality after a push from a trained actor (a few AdamW steps away from the checkpoint), to
   one server and to two servers (the prompts spread over both);
2. a weight push of the whole model to one server (gloo weight-transfer backend) vs the same push into a
   colocated ``VLLMEngine`` (in process), vs this machine's memory-copy rate, measured in the same run;
3. GRPO steps on a server vs colocated vLLM, with each phase's time (``rollout/*`` of the callback).

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 DS_ACCELERATOR=cpu PYTHONPATH=. \\
        .venv-vllm/bin/python bench/bench_server.py [--grpo-steps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightrft_lightning.engines.base import SamplingParams  # noqa: E402
from lightrft_lightning.engines.server import VLLMServerEngine  # noqa: E402
from lightrft_lightning.engines.weight_sync import push_weights  # noqa: E402
from lightrft_lightning.pretrained import resolve  # noqa: E402
from tests.vllm.common import greedy, max_logprob_diff, set_env  # noqa: E402
from tests.vllm.servers import served  # noqa: E402

NEW = 12
BUCKET = 64 << 20


def trained_actor(path: str, steps: int = 3) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-4)
    ids = torch.randint(100, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = actor(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return actor.eval()


def memcpy_rate(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    return 3 * nbytes / (time.perf_counter() - start)


PHASES = ("rollout/sync_s", "rollout/generate_s", "time/score", "time/train")


class Times(pl.Callback):
    """Each training step's end time and logged metrics."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def grpo_times(engine, steps: int, prompts: int = 64, **grpo_args) -> Times:
    """``steps`` GRPO steps on the real model (one process, ``LightRFTFake``, arithmetic task) with ``engine``
    for rollouts; ``grpo_args`` override GRPO's arguments. Returns each step's end time and metrics."""
    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.callbacks import RolloutEngineCallback
    from lightrft_lightning.data import PromptDataModule
    from lightrft_lightning.tasks import arithmetic_problems

    pl.seed_everything(0, verbose=False)
    model = GRPO(**{"model": "smollm2-135m-instruct", "apply_chat_template": True,
                    "rewards": {"lightrft_lightning.tasks:arithmetic_reward": 1.0}, "n_samples_per_prompt": 4,
                    "max_new_tokens": 32, "temperature": 1.0, "micro_train_batch_size": 4,
                    "actor_learning_rate": 1e-5, **grpo_args})
    data = PromptDataModule(prompts=arithmetic_problems(prompts, seed=3), batch_size=2, shuffle=False)
    times = Times()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=LightRFTFake({"seed": 0}), max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[RolloutEngineCallback(engine=engine, bucket_bytes=BUCKET), times])
    trainer.fit(model, data)
    return times


def grpo(engine, steps: int) -> dict[str, float]:
    """:func:`grpo_times`: steps/s after the first (warm-up) step and each phase's mean seconds over the same steps."""
    times = grpo_times(engine, steps)
    timed = times.metrics[1:]
    return {"steps/s": (len(times.ends) - 1) / (times.ends[-1] - times.ends[0]),
            **{k: sum(m.get(k, 0.0) for m in timed) / len(timed) for k in PHASES}}


def prompts(tokenizer) -> list[list[int]]:
    texts = ["What is 12 + 7?", "What is the capital of France?", "Name a colour.", "Write a haiku about rain.",
             "Count to five.", "What is 3 * 4?"]
    from lightrft_lightning.data import render_prompts

    return [list(map(int, ids)) for ids in render_prompts([{"prompt": t} for t in texts], tokenizer,
                                                           apply_chat_template=True)[1]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpo-steps", type=int, default=0,
                        help="also time this many GRPO steps (>= 2) on one server and colocated")
    args = parser.parse_args()
    if args.grpo_steps == 1 or args.grpo_steps < 0:
        parser.error(f"--grpo-steps={args.grpo_steps} is invalid; accepted: 0 (off) or >= 2 (the first is warm-up)")
    from transformers import AutoTokenizer

    path = resolve("smollm2-135m-instruct")
    ids = prompts(AutoTokenizer.from_pretrained(path))
    actor = trained_actor(path)
    ref = greedy(actor, ids, NEW)
    nbytes = sum(p.numel() * p.element_size() for p in actor.parameters())
    rows, grpo_rows = [], []
    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=NEW, stop_at_eos=False)
    with served(path, count=2, args=["--dtype", "float32", "--max-model-len", "1024"]) as servers:
        for count in (1, 2):
            engine = VLLMServerEngine([s.url for s in servers[:count]], timeout_s=300)
            pushes = []
            for _ in range(2):  # the first push also sets up the weight-transfer group
                start = time.perf_counter()
                moved = push_weights(actor, engine, BUCKET)
                pushes.append(time.perf_counter() - start)
            out = engine.generate(ids, greedy_params)
            matched = sum(c.token_ids == r for c, r in zip(out, ref))
            diff = max_logprob_diff(actor, ids, out)
            rows.append((f"{count} server(s), first push (group set-up)", matched, len(ids), diff, pushes[0], moved))
            rows.append((f"{count} server(s), next push", matched, len(ids), diff, pushes[1], moved))
            if count == 1 and args.grpo_steps:
                grpo_rows.append(("1 server", grpo(engine, args.grpo_steps)))
            engine.close()
    copy = memcpy_rate(nbytes)
    from lightrft_lightning.engines.vllm import VLLMEngine

    local = VLLMEngine(path, dtype="float32", max_model_len=1024, enforce_eager=True)
    start = time.perf_counter()
    push_weights(actor, local, BUCKET)
    local_s = time.perf_counter() - start
    out = local.generate(ids, greedy_params)
    local_matched = sum(c.token_ids == r for c, r in zip(out, ref))
    if args.grpo_steps:
        grpo_rows.append(("colocated VLLMEngine", grpo(local, args.grpo_steps)))
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"\nSmolLM2-135M-Instruct fp32 ({nbytes / 1e6:.0f} MB), CPU {cpu}, bucket {BUCKET >> 20} MiB")
    print("| where | greedy prompts matched | max logprob diff | push s | push MB/s |")
    print("|---|---|---|---|---|")
    for name, m, n, diff, s, moved in rows:
        print(f"| {name} | {m}/{n} | {diff:.2g} | {s:.2f} | {moved / s / 1e6:.0f} |")
    print(f"| colocated VLLMEngine | {local_matched}/{len(ids)} | - | {local_s:.2f} | {nbytes / local_s / 1e6:.0f} |")
    print(f"| memory copy (torch copy_) | - | - | {nbytes / copy:.3f} | {copy / 1e6:.0f} |")
    if grpo_rows:
        print(f"\nGRPO, 1 process, {args.grpo_steps - 1} timed steps (2 prompts x 4 samples x 32 tokens), mean s per step")
        print("| rollouts on | steps/s | " + " | ".join(PHASES) + " |")
        print("|---|---|" + "---|" * len(PHASES))
        for name, r in grpo_rows:
            print(f"| {name} | {r['steps/s']:.3f} | " + " | ".join(f"{r[k]:.2f}" for k in PHASES) + " |")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    main()
    os._exit(0)
