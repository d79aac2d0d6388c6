"""The arithmetic task: seeded problems, disjoint splits, answer extraction and its rewards."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lightrft_lightning.algorithms import CombinedReward
from lightrft_lightning.tasks import (arithmetic_problems, arithmetic_reward, arithmetic_splits, extract_answer,
                                      format_reward)

DIFFICULTIES = ("easy", "medium", "hard")
PROMPT = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
DIGITS = {"easy": {"+": (1, 1), "-": (2, 1), "*": (1, 1)},
          "medium": {"+": (2, 2), "-": (2, 2), "*": (2, 1)},
          "hard": {"+": (3, 3), "-": (3, 3), "*": (2, 2)}}


def _operands(row):
    match = PROMPT.fullmatch(row["prompt"])
    assert match, row
    a, op, b = match.groups()
    return a, op, b


def test_problems_are_seeded():
    assert arithmetic_problems(30, seed=3) == arithmetic_problems(30, seed=3)
    assert arithmetic_problems(30, seed=3) != arithmetic_problems(30, seed=4)
    assert arithmetic_problems(10, seed=3) == arithmetic_problems(30, seed=3)[:10]


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard", "mixed"])
def test_answers_are_correct_and_sized(difficulty):
    rows = arithmetic_problems(300, seed=1, difficulty=difficulty)
    for row in rows:
        a, op, b = _operands(row)
        assert row["operation"] == op
        assert row["difficulty"] in (DIFFICULTIES if difficulty == "mixed" else (difficulty,))
        assert (len(a), len(b)) == DIGITS[row["difficulty"]][op], row
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["answer"] == str(expected) and expected >= 0, row
        assert set(row) == {"prompt", "answer", "operation", "difficulty"}


def test_operations_and_difficulties_are_balanced():
    assert Counter(r["operation"] for r in arithmetic_problems(90)) == {"+": 30, "-": 30, "*": 30}
    mixed = Counter((r["difficulty"], r["operation"]) for r in arithmetic_problems(90, difficulty="mixed"))
    assert mixed == {(d, op): 10 for d in DIFFICULTIES for op in "+-*"}
    only = arithmetic_problems(20, operations=["*", "-"], difficulty="hard")
    assert Counter(r["operation"] for r in only) == {"*": 10, "-": 10}
    assert {r["difficulty"] for r in only} == {"hard"}


def test_splits_are_disjoint_sized_and_deterministic():
    train, held = arithmetic_splits(400, 150, seed=2)
    assert len(train) == 400 and len(held) == 150
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"] for r in held}) == 150
    assert Counter(r["operation"] for r in train) == {"+": 134, "-": 133, "*": 133}
    assert arithmetic_splits(400, 150, seed=2) == (train, held)
    assert arithmetic_splits(10, 150, seed=2)[1] == held
    assert arithmetic_splits(400, 150, seed=5)[1] != held
    train, held = arithmetic_splits(200, 60, seed=0, operations=["+"])
    # 81 easy "+" prompts, 60 held out: train repeats the 21 left
    assert len({r["prompt"] for r in train}) == 21
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_splits_raise_when_the_problem_space_is_too_small():
    with pytest.raises(ValueError, match=r"arithmetic_splits\(train=5, held_out=81\) cannot find train problem"):
        arithmetic_splits(5, 81, operations=["+"])
    with pytest.raises(ValueError, match="cannot find held_out problem"):
        arithmetic_splits(5, 82, operations=["*"])


EXTRACTION = [
    ("12 + 7 = 19", "19"),
    ("The answer is 19.", "19"),
    ("\\boxed{19}", "19"),
    ("**19**", "19"),
    ("19.", "19"),
    ("19", "19"),
    ("To solve this, I multiply 9 by 8.\n9 * 8 = 72. So the answer is 72", "72"),
    ("1,234", "1234"),
    ("The total is 1,234,567 apples.", "1234567"),
    ("-5", "-5"),
    ("3 - 8 = -5", "-5"),
    ("42.0", "42"),
    ("42.5", "42.5"),
    ("The result is 7.50", "7.5"),
    ("First, 23 + 7 = 30. Then I check: 30 - 7 = 23, correct. \\boxed{30}\nHope this helps in 2 ways!", "30"),
    ("The answer is $\\boxed{-12}$.", "-12"),
    ("\\boxed{\\text{56}}", "56"),
    ("= 42", "42"),
    ("What is 5 * 6? The answer is: 30", "30"),
    ("Answer: 007", "7"),
    ("I think it is 45, but let me recompute: 6 * 8 = 48.", "48"),
    ("x-5", "5"),
    ("The difference is \u22123.", "-3"),
    ("I'm not sure how to solve this.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_rewards_on_a_batch():
    completions = ["30", "The answer is 30.", "\\boxed{30}", "23 + 7 = 29", "I don't know",
                   "23 + 7 = 30.0", "Let me think step by step. 23 + 7 means adding 7 to 23, so 23 + 7 = 30. " * 2,
                   "1,234", "= 12 = 30"]
    metadata = [{"answer": "30", "operation": "+"}] * 7 + [{"answer": "1234"}, {"answer": "30"}]
    prompts = ["What is 23 + 7?"] * len(completions)
    assert arithmetic_reward(prompts, completions, metadata) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert format_reward(prompts, completions, metadata) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    combined = CombinedReward({"lightrft_lightning.tasks:arithmetic_reward": 1.0,
                               "lightrft_lightning.tasks:format_reward": 0.1})
    assert combined(prompts, completions, metadata).tolist() == pytest.approx(
        [1.1, 1.1, 1.0, 0.1, 0.0, 1.1, 1.0, 1.1, 1.0])


def test_reward_on_generated_rows():
    rows = arithmetic_problems(12, difficulty="mixed")
    metadata = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    prompts = [r["prompt"] for r in rows]
    right = [f"{p[8:-1]} = {r['answer']}" for p, r in zip(prompts, rows)]
    wrong = [f"\\boxed{{{int(r['answer']) + 1}}}" for r in rows]
    assert arithmetic_reward(prompts, right, metadata) == [1.0] * 12
    assert arithmetic_reward(prompts, wrong, metadata) == [0.0] * 12


def test_reward_needs_numeric_answers():
    with pytest.raises(ValueError, match="arithmetic_reward needs an 'answer' field in every prompt row; rows \\[1\\]"):
        arithmetic_reward(["p", "p"], ["1", "2"], [{"answer": "1"}, {"operation": "+"}])
    with pytest.raises(ValueError, match="arithmetic_reward: row 0 has 'answer'='abc'; accepted: a number"):
        arithmetic_reward(["p"], ["1"], [{"answer": "abc"}])


@pytest.mark.parametrize("call,match", [
    (lambda: arithmetic_problems(0), r"arithmetic_problems\.num=0 is invalid; accepted: an integer >= 1"),
    (lambda: arithmetic_problems(2.0), r"arithmetic_problems\.num=2\.0 is invalid"),
    (lambda: arithmetic_problems(True), r"arithmetic_problems\.num=True is invalid"),
    (lambda: arithmetic_problems(4, difficulty="x"),
     r"arithmetic_problems\.difficulty='x' is invalid; accepted: easy, medium, hard, mixed"),
    (lambda: arithmetic_problems(4, operations=["/"]),
     r"arithmetic_problems\.operations=\['/'\] is invalid; accepted: a non-empty sequence of '\+', '-', '\*'"),
    (lambda: arithmetic_problems(4, operations=[]), r"arithmetic_problems\.operations=\[\] is invalid"),
    (lambda: arithmetic_problems(4, operations=None), r"arithmetic_problems\.operations=None is invalid"),
    (lambda: arithmetic_splits(0, 5), r"arithmetic_splits\.train=0 is invalid; accepted: an integer >= 1"),
    (lambda: arithmetic_splits(5, -1), r"arithmetic_splits\.held_out=-1 is invalid"),
    (lambda: arithmetic_splits(5, 5, difficulty="expert"), r"arithmetic_splits\.difficulty='expert' is invalid"),
    (lambda: arithmetic_splits(5, 5, operations="%"), r"arithmetic_splits\.operations='%' is invalid"),
    (lambda: arithmetic_splits(5, 5, num=3), r"arithmetic_splits got unknown argument\(s\) \['num'\]; accepted: "
                                             r"operations, difficulty"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_validation_logs_greedy_accuracy_and_mean_at_n():
    """val/accuracy is the first reward's mean over greedy completions, val/mean@n over n samples:
    a reward that scores only "5" tells them apart from the weighted total (val/reward)."""
    import lightning.pytorch as pl

    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.data import PromptDataModule

    pl.seed_everything(0, verbose=False)
    rows = arithmetic_problems(6, seed=1)
    model = GRPO(tokenizer_chars="0123456789+-*=?whatis ", model_config={"hidden_size": 32}, max_new_tokens=3,
                 rewards={"tests.test_tasks:starts_with_5": 1.0, "lightrft_lightning.tasks:format_reward": 2.0},
                 val_samples=4, val_temperature=1.0)
    data = PromptDataModule(prompts=rows, val_prompts=rows, batch_size=3, val_batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    metrics = trainer.validate(model, data, verbose=False)[0]
    greedy = model._actor_generate([model.tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in rows],
                                   num=1, do_sample=False)
    assert metrics["val/accuracy"] == pytest.approx(sum(starts_with_5([], greedy, [])) / len(rows))
    assert 0.0 <= metrics["val/mean@4"] <= 1.0
    fmt = format_reward([], greedy, [{"answer": r["answer"]} for r in rows])
    expected_total = (sum(starts_with_5([], greedy, [])) + 2.0 * sum(fmt)) / len(rows)
    assert metrics["val/reward"] == pytest.approx(expected_total)


def starts_with_5(prompts, completions, metadata):
    return [1.0 if c.startswith("5") else 0.0 for c in completions]
