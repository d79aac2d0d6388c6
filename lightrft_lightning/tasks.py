"""The built-in verifiable task of the demo: continue counting.

A prompt is a run of 1 to 3 consecutive digits (``"345"``); the answer continues it modulo 10
(``"6789"`` for 4 answer digits). The reward is the fraction of answer digits in the right place,
so a random-init model starts near 1/vocab and has a dense signal to climb.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from lightrft_lightning.algorithms.rewards import answers

CHARS = "0123456789"


def _check_count(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: an integer >= 1")


def counting_prompts(num: int, answer_len: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """``num`` prompts as ``{"prompt": "345", "answer": "6789"}`` rows (seeded)."""
    _check_count("counting_prompts", "num", num)
    _check_count("counting_prompts", "answer_len", answer_len)
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        start, length = rng.randrange(10), rng.randint(1, 3)
        prompt = "".join(str((start + i) % 10) for i in range(length))
        answer = "".join(str((start + length + i) % 10) for i in range(answer_len))
        rows.append({"prompt": prompt, "answer": answer})
    return rows


def counting_reward(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]) -> list[float]:
    """Fraction of ``metadata[i]["answer"]`` matched position by position by ``completions[i]``."""
    targets = answers(metadata, "counting_reward")
    empty = [i for i, a in enumerate(targets) if not a]
    if empty:
        raise ValueError(f"counting_reward: rows {empty[:8]} have an empty 'answer'; accepted: a non-empty string")
    return [sum(a == b for a, b in zip(c, t)) / len(t) for c, t in zip(completions, targets)]


def all_counting_prompts(answer_len: int = 4) -> list[dict[str, Any]]:
    """Every distinct prompt of the task (30: 10 starts x 3 lengths), e.g. for validation."""
    _check_count("all_counting_prompts", "answer_len", answer_len)
    return [{"prompt": "".join(str((s + i) % 10) for i in range(n)),
             "answer": "".join(str((s + n + i) % 10) for i in range(answer_len))}
            for n in (1, 2, 3) for s in range(10)]
