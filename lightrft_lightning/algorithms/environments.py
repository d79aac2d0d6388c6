"""`Environment`: what a multi-turn episode talks to, gymnasium-style (``reset`` then ``step`` until
done). One instance per episode, built by calling the environment class (a factory, as TRL's
``environment_factory``): its state is the episode's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

#: a message as chat templates take it: ``{"role": ..., "content": ...}``
Message = dict[str, Any]
#: an observation: chat messages, or (first observation only) a plain prompt string
Observation = Union[str, list[Message]]


@dataclass
class Step:
    """What the environment answers a model turn with: the next messages (appended to the conversation
    with the chat template; ignored when ``done``), the turn's reward, and whether the episode ends."""

    observation: list[Message] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False


class Environment:
    """Subclass and implement :meth:`reset` and :meth:`step`; list tools (plain functions with type
    hints and an ``Args:`` docstring) in ``tools``. Tool calls in a model turn are answered by the
    rollout (the environment's :meth:`step` sees the turns without tool calls).

    The default is the single-turn case: the row's prompt, and done after the first model turn with
    reward 0 (the rollout's reward functions score it)."""

    tools: list[Callable] = []

    def reset(self, row: dict[str, Any]) -> Observation:
        """The first observation of an episode on the data row ``row``: its ``messages`` or ``prompt``."""
        return row["messages"] if "messages" in row else row["prompt"]

    def step(self, completion: str) -> Step:
        """Answer the model's turn ``completion`` (its text, special tokens skipped)."""
        return Step(done=True)
