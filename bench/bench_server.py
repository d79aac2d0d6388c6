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


def prompts(tokenizer) -> list[list[int]]:
    texts = ["What is 12 + 7?", "What is the capital of France?", "Name a colour.", "Write a haiku about rain.",
             "Count to five.", "What is 3 * 4?"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpo-steps", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    path = resolve("smollm2-135m-instruct")
    ids = prompts(AutoTokenizer.from_pretrained(path))
    actor = trained_actor(path)
    ref = greedy(actor, ids, NEW)
    nbytes = sum(p.numel() * p.element_size() for p in actor.parameters())
    rows = []
    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=NEW, stop_at_eos=False)
    with served(path, count=2, args=["--dtype", "float32", "--max-model-len", "1024"]) as servers:
        for count in (1, 2):
            engine = VLLMServerEngine([s.url for s in servers[:count]], timeout_s=300)
            start = time.perf_counter()
            moved = push_weights(actor, engine, BUCKET)
            push_s = time.perf_counter() - start
            out = engine.generate(ids, greedy_params)
            matched = sum(c.token_ids == r for c, r in zip(out, ref))
            rows.append((f"{count} server(s)", matched, len(ids), max_logprob_diff(actor, ids, out), push_s, moved))
            engine.close()
    copy = memcpy_rate(nbytes)
    from lightrft_lightning.engines.vllm import VLLMEngine

    local = VLLMEngine(path, dtype="float32", max_model_len=1024, enforce_eager=True)
    start = time.perf_counter()
    push_weights(actor, local, BUCKET)
    local_s = time.perf_counter() - start
    out = local.generate(ids, greedy_params)
    local_matched = sum(c.token_ids == r for c, r in zip(out, ref))
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"\nSmolLM2-135M-Instruct fp32 ({nbytes / 1e6:.0f} MB), CPU {cpu}, bucket {BUCKET >> 20} MiB")
    print("| where | greedy prompts matched | max logprob diff | push s | push MB/s |")
    print("|---|---|---|---|---|")
    for name, m, n, diff, s, moved in rows:
        print(f"| {name} | {m}/{n} | {diff:.2g} | {s:.2f} | {moved / s / 1e6:.0f} |")
    print(f"| colocated VLLMEngine | {local_matched}/{len(ids)} | - | {local_s:.2f} | {nbytes / local_s / 1e6:.0f} |")
    print(f"| memory copy (torch copy_) | - | - | {nbytes / copy:.3f} | {copy / 1e6:.0f} |")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    main()
    os._exit(0)
