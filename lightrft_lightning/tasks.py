"""The built-in verifiable tasks: continue counting, and integer arithmetic.

Counting (the demo task): a prompt is a run of 1 to 3 consecutive digits (``"345"``); the answer
continues it modulo 10 (``"6789"`` for 4 answer digits). The reward is the fraction of answer digits in
the right place, so a random-init model starts near 1/vocab and has a dense signal to climb.

Arithmetic (for small instruct models such as SmolLM2-135M-Instruct): a prompt asks
``"What is 23 + 7?"`` with ``+``, ``-`` or ``*`` at an easy, medium or hard size; the answer is the
integer result. ``arithmetic_reward`` is 1.0 when the final number of the completion (``\\boxed{..}``
first, else the last number) equals it; ``format_reward`` is a small optional bonus for a short direct
answer. ``arithmetic_splits`` gives a train split and a held-out split that share no prompt.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Any, Optional, Sequence

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


OPERATIONS = ("+", "-", "*")
DIFFICULTIES = ("easy", "medium", "hard")
_DIGITS = {1: (1, 9), 2: (10, 99), 3: (100, 999)}
# (digits of the left operand, digits of the right operand)
_SHAPES = {
    "easy": {"+": (1, 1), "-": (2, 1), "*": (1, 1)},
    "medium": {"+": (2, 2), "-": (2, 2), "*": (2, 1)},
    "hard": {"+": (3, 3), "-": (3, 3), "*": (2, 2)},
}
_SPLIT_OPTIONS = ("operations", "difficulty")
_MAX_TRIES = 1000


def _plan(owner: str, operations: Sequence[str], difficulty: str) -> list[tuple[str, str]]:
    """The (difficulty, operation) cycle rows follow, so every combination appears evenly."""
    if difficulty not in DIFFICULTIES + ("mixed",):
        raise ValueError(f"{owner}.difficulty={difficulty!r} is invalid; accepted: "
                         f"{', '.join(DIFFICULTIES + ('mixed',))}")
    try:
        ops = tuple(operations)
    except TypeError:
        ops = None
    if not ops or any(not isinstance(op, str) or op not in OPERATIONS for op in ops):
        raise ValueError(f"{owner}.operations={operations!r} is invalid; accepted: a non-empty sequence "
                         f"of {', '.join(repr(op) for op in OPERATIONS)}")
    levels = DIFFICULTIES if difficulty == "mixed" else (difficulty,)
    return [(level, op) for level in levels for op in ops]


def _problem(rng: random.Random, difficulty: str, op: str) -> dict[str, Any]:
    left, right = _SHAPES[difficulty][op]
    a, b = rng.randint(*_DIGITS[left]), rng.randint(*_DIGITS[right])
    if op == "-" and a < b:
        a, b = b, a
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(result), "operation": op, "difficulty": difficulty}


def arithmetic_problems(num: int, seed: int = 0, operations: Sequence[str] = OPERATIONS,
                        difficulty: str = "easy") -> list[dict[str, Any]]:
    """``num`` seeded rows ``{"prompt": "What is 23 + 7?", "answer": "30", "operation": "+",
    "difficulty": "easy"}``.

    Operands (single-digit is 1-9): ``"easy"`` is 1-digit + 1-digit, 2-digit - 1-digit, 1-digit * 1-digit;
    ``"medium"`` is 2-digit + 2-digit, 2-digit - 2-digit, 2-digit * 1-digit; ``"hard"`` is
    3-digit + 3-digit, 3-digit - 3-digit, 2-digit * 2-digit. Differences are never negative. Rows cycle
    through ``operations`` (and, for ``"mixed"``, through every difficulty x operation pair), so each
    combination is represented evenly.
    """
    _check_count("arithmetic_problems", "num", num)
    plan = _plan("arithmetic_problems", operations, difficulty)
    rng = random.Random(seed)
    return [_problem(rng, *plan[i % len(plan)]) for i in range(num)]


def arithmetic_splits(train: int, held_out: int, seed: int = 0,
                      **kwargs: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train_rows, held_out_rows)`` of arithmetic problems sharing no prompt text.

    ``kwargs`` are ``operations`` and ``difficulty`` of :func:`arithmetic_problems`. The held-out rows
    are distinct and depend only on ``seed`` and ``held_out`` (not on ``train``); train rows are drawn
    from their own seed, skipping held-out prompts (they may repeat among themselves). Both splits keep
    the even cycle of combinations. Raises ``ValueError`` when a combination has too few distinct
    problems to fill the splits.
    """
    _check_count("arithmetic_splits", "train", train)
    _check_count("arithmetic_splits", "held_out", held_out)
    unknown = sorted(set(kwargs) - set(_SPLIT_OPTIONS))
    if unknown:
        raise ValueError(f"arithmetic_splits got unknown argument(s) {unknown}; accepted: "
                         f"{', '.join(_SPLIT_OPTIONS)}")
    plan = _plan("arithmetic_splits", kwargs.get("operations", OPERATIONS), kwargs.get("difficulty", "easy"))

    def draw(split: str, num: int, excluded: set[str], distinct: bool) -> list[dict[str, Any]]:
        rng = random.Random(f"arithmetic_splits/{split}/{seed}")
        rows = []
        for i in range(num):
            level, op = plan[i % len(plan)]
            for _ in range(_MAX_TRIES):
                row = _problem(rng, level, op)
                if row["prompt"] not in excluded:
                    break
            else:
                raise ValueError(f"arithmetic_splits(train={train}, held_out={held_out}) cannot find {split} "
                                 f"problem {i + 1} of difficulty {level!r} and operation {op!r} outside the "
                                 f"{len(excluded)} taken prompts after {_MAX_TRIES} draws; accepted: smaller "
                                 "splits or a harder difficulty (more distinct problems)")
            if distinct:
                excluded.add(row["prompt"])
            rows.append(row)
        return rows

    taken: set[str] = set()
    held = draw("held_out", held_out, taken, distinct=True)
    return draw("train", train, taken, distinct=False), held


_BOXED = re.compile(r"\\?boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"([-\u2212]?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")


def _normalize(text: str, match: re.Match) -> str:
    sign, whole, frac = match.groups()
    start = match.start()
    if sign and start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]}"):
        sign = ""
    frac = (frac or ".").rstrip("0").rstrip(".")
    value = str(int(whole.replace(",", ""))) + frac
    return value if value.strip("0.") == "" or not sign else "-" + value


def extract_answer(text: str) -> Optional[str]:
    """The final number of a model's answer, normalized (``"1,234"`` -> ``"1234"``, ``"42.0"`` -> ``"42"``).

    The last ``\\boxed{...}`` holding a number wins; otherwise the last number of the text. A ``-``
    (or U+2212) is a sign only when it does not follow a letter, digit or closing bracket. ``None``
    when there is no number.
    """
    for box in reversed(_BOXED.findall(text)):
        matches = list(_NUMBER.finditer(box))
        if matches:
            return _normalize(box, matches[-1])
    matches = list(_NUMBER.finditer(text))
    return _normalize(text, matches[-1]) if matches else None


def _targets(metadata: Sequence[dict], reward: str) -> list[Fraction]:
    values = []
    for i, answer in enumerate(answers(metadata, reward)):
        try:
            values.append(Fraction(answer.strip().replace(",", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{reward}: row {i} has 'answer'={answer!r}; accepted: a number such as "
                             "'42' or '-3'") from None
    return values


def arithmetic_reward(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]) -> list[float]:
    """1.0 where :func:`extract_answer` of ``completions[i]`` equals ``metadata[i]["answer"]`` as a number."""
    targets = _targets(metadata, "arithmetic_reward")
    scores = []
    for completion, target in zip(completions, targets):
        found = extract_answer(completion)
        scores.append(float(found is not None and Fraction(found) == target))
    return scores


def format_reward(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]) -> list[float]:
    """1.0 where ``completions[i]`` is a short direct answer, else 0.0 (whether it is right is not checked).

    Short direct answer: the stripped completion is at most 64 characters, holds at most one ``=``, and
    ends with the number :func:`extract_answer` reads (optionally followed by ``.``), as in
    ``"19"``, ``"12 + 7 = 19"`` or ``"The answer is 19."``; ``"\\boxed{19}"`` and ``"**19**"`` get 0.0.
    """
    scores = []
    for completion in completions:
        text = completion.strip()
        found = extract_answer(text)
        matches = list(_NUMBER.finditer(text))
        last = matches[-1] if matches else None
        scores.append(float(
            found is not None and len(text) <= 64 and text.count("=") <= 1
            and text[last.end():] in ("", ".") and _normalize(text, last) == found))
    return scores
