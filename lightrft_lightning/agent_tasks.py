"""The built-in multi-turn tasks (environments for :class:`~lightrft_lightning.algorithms.MultiTurnRollout`)
on the arithmetic rows of :mod:`lightrft_lightning.tasks`: with a calculator tool, and with feedback
on a wrong answer and another try."""

from __future__ import annotations

import ast
import operator
from fractions import Fraction
from typing import Any

from lightrft_lightning.algorithms.environments import Environment, Message, Step
from lightrft_lightning.tasks import extract_answer

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses.

    Args:
        expression: the expression, e.g. "23 * (4 + 5)"
    """
    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError(f"unsupported expression {ast.unparse(node)!r}; accepted: numbers, + - * / and parentheses")

    result = value(ast.parse(expression, mode="eval").body)
    return str(result.numerator if result.denominator == 1 else float(result))


def correct(completion: str, row: dict[str, Any]) -> bool:
    """Whether the completion's final number is the row's ``answer``."""
    found = extract_answer(completion)
    return found is not None and Fraction(found) == Fraction(str(row["answer"]))


class CalculatorArithmetic(Environment):
    """An arithmetic question with a calculator tool; reward 1.0 for a right final answer, one answer."""

    tools = [calculator]

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.row = row
        return [{"role": "user", "content": f"{row['prompt']} Use the calculator tool, then give the final number."}]

    def step(self, completion: str) -> Step:
        return Step(reward=float(correct(completion, self.row)), done=True)


class RetryArithmetic(Environment):
    """An arithmetic question; a wrong answer is answered with feedback and the model tries again
    (reward 1.0 when it gets it right, on any try; the rollout's ``max_turns`` bounds the tries)."""

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.row = row
        return [{"role": "user", "content": f"{row['prompt']} Answer with the number only."}]

    def step(self, completion: str) -> Step:
        if correct(completion, self.row):
            return Step(reward=1.0, done=True)
        return Step([{"role": "user", "content": "That is not right. Check your arithmetic and try again."}])
