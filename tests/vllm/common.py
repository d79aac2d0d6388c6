"""Shared by the real-vLLM tests (run in ``.venv-vllm``) and their multi-rank scripts: a tiny tied-embedding
model vLLM's CPU kernels accept (head_dim 64), and the actor-side references the engine is compared with."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

# head_dim = 128 / 2 = 64 (vLLM on CPU refuses head_dim 16); one KV head; lm_head tied to embed_tokens
TINY = dict(vocab_size=96, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
            num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=True)
# TORCH_EXTENSIONS_DIR: DeepSpeed's JIT-built CPU op, one build per venv (sharing one makes each venv rebuild it)
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
       "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, "torch_extensions")}


def set_env() -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


def save_tiny(path: str, seed: int = 0) -> str:
    """A tiny tied Qwen2 saved as a Hugging Face directory (no tokenizer: the engine works on token ids)."""
    from lightrft_lightning.tiny_models import tiny_causal_lm

    model = tiny_causal_lm(seed=seed, **TINY)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    return path


@torch.no_grad()
def greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The actor's own greedy decode: full forward passes, no cache and no padding (prompts of one
    length run as a batch). Every forward is a collective on a sharded actor, so all ranks must call it
    with the same shapes."""
    out: list[list[int]] = []
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    result: dict[int, list[int]] = {}
    for _, rows in sorted(by_length.items()):
        ids = torch.tensor([prompts[i] for i in rows])
        start = ids.shape[1]
        for _ in range(new_tokens):
            logits = model(input_ids=ids).logits[:, -1, :].float()
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        for row, i in enumerate(rows):
            result[i] = ids[row, start:].tolist()
    out = [result[i] for i in range(len(prompts))]
    return out


@torch.no_grad()
def logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The actor's fp32 log-probs of ``tokens`` after ``prompt`` (temperature 1)."""
    seq = torch.tensor([prompt + tokens])
    logits = model(input_ids=seq).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def max_logprob_diff(model: torch.nn.Module, prompts: list[list[int]], completions) -> float:
    return max((logprobs(model, prompts[c.prompt_index], c.token_ids) - torch.tensor(c.logprobs)).abs().max().item()
               for c in completions)


def save_tiny_served(path: str, seed: int = 0) -> str:
    """:func:`save_tiny` with a character tokenizer covering its 96 ids: a vLLM server's completions
    endpoint needs a tokenizer to return token ids with log-probs (the ids travel as ids, never as text)."""
    import string

    from lightrft_lightning.tokenizer import char_tokenizer

    save_tiny(path, seed)
    char_tokenizer(string.printable[:TINY["vocab_size"] - 3]).save_pretrained(path)
    return path


def cli_fit_rows(config: str, tmp_path: Any, *args: str, timeout: float = 500) -> list[dict[str, str]]:
    """``lightrft-lightning fit --config examples/<config>.yaml ARGS`` (2 ranks, Lightning's launcher) into
    ``tmp_path``; the CSV logger's rows that hold a reward."""
    import csv
    import subprocess

    from tests.launch import ROOT, script_env

    command = [sys.executable, "-m", "lightrft_lightning.cli", "fit", "--config", f"examples/{config}.yaml", *args,
               f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_checkpointing=false"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=script_env(), cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    run_dir = next((tmp_path / config).iterdir())
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("reward")]
