"""The rollout-engine interface every engine (HF, vLLM, SGLang) implements."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch


@dataclass
class SamplingParams:
    """How to sample completions. ``n`` completions per prompt; ``top_k=-1`` and ``top_p=1.0``
    disable those filters; ``temperature=0`` is greedy; ``seed`` makes sampling repeatable."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16
    stop_at_eos: bool = True
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n!r} is invalid; accepted: an integer >= 1")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature!r} is invalid; accepted: a number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p!r} is invalid; accepted: a number in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k={self.top_k!r} is invalid; accepted: -1 (off) or an integer >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens!r} is invalid; accepted: an integer >= 1")


#: what a weight push does to the requests in flight: "finish" (they finish on the old weights first), "keep"
#: (they continue on the new ones) or "abort" (they are sampled again on the new ones)
IN_FLIGHT_MODES = ("finish", "keep", "abort")


@dataclass
class Completion:
    """One sampled completion: the prompt it came from, its token ids and their log-probs under the
    engine's weights (same length as ``token_ids``), and why it stopped ("eos" or "length")."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    #: the weight version that sampled each token, where the engine reports it (a server generating while
    #: weights change: :attr:`VLLMServerEngine.in_flight` "keep" or "abort"); empty otherwise
    versions: list[int] = field(default_factory=list)


class RolloutEngine(ABC):
    """Generates completions for RLHF rollouts and receives weight updates from the actor.

    Lifecycle during training: ``wake_up(["weights"])`` -> ``update_weights(...)`` ->
    ``wake_up(["kv_cache"])`` -> ``generate(...)`` -> ``sleep(level)``.
    """

    #: whether the engine generates on devices of its own (a server), so that generation can overlap
    #: training (asynchronous rollouts); colocated engines share the trainer's devices
    separate_devices: bool = False
    #: what a weight push may do to the requests generating (:data:`IN_FLIGHT_MODES`): an engine that cannot pause
    #: mid-request lets them finish first
    in_flight_modes: tuple[str, ...] = ("finish",)

    @abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Sample ``params.n`` completions for each prompt, grouped by prompt (prompt 0's n first)."""

    @abstractmethod
    def sleep(self, level: int = 1) -> None:
        """Free device memory: level 1 keeps weights in CPU memory, level 2 drops them."""

    @abstractmethod
    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Restore device memory; ``tags`` is a subset of ["weights", "kv_cache"] (None: both)."""

    @property
    @abstractmethod
    def is_sleeping(self) -> bool:
        """Whether any part of the engine is asleep."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, last_bucket: bool = True) -> None:
        """Load new weights, given as (Hugging Face name, tensor) pairs, possibly in several calls
        (buckets; ``last_bucket`` is false on all but the last); the engine keeps weights it was not
        sent. The engine must be awake (at least its weights)."""

    @property
    @abstractmethod
    def weights_survive_sleep(self) -> bool:
        """Whether weights are still valid after ``sleep`` at the engine's configured level."""

    def load_weight_buckets(self, buckets: Iterable[tuple[list[tuple[str, torch.Tensor]], bool]]) -> None:
        """Load one complete weight update, streamed as ``(bucket, is_last)`` pairs: a bucket is a list of
        (Hugging Face name, tensor) pairs, valid only until the next bucket is asked for (``push_weights``
        gathers each bucket when it is reached). Default: one :meth:`update_weights` per bucket."""
        for tensors, last in buckets:
            self.update_weights(tensors, last_bucket=last)

    def finish_weight_update(self) -> None:
        """Called after the last bucket (engines reset their prefix cache here)."""

    def tag_weight_version(self, version: int) -> None:
        """The learner's step the next update carries as its weight version (engines that report one)."""

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The dtype the engine keeps its weights in (``None``: unknown)."""
        return None


class EngineStateError(RuntimeError):
    """An engine was asked to do something its sleep/wake or weight state does not allow."""


_POOLS = ("weights", "kv_cache")


class LifecycleEngine(RolloutEngine):
    """The sleep/wake and weight-validity bookkeeping every engine shares.

    Subclasses implement ``_sleep``, ``_wake``, ``_load`` and ``_generate`` on their backend; this
    class refuses what would use missing or stale weights: generating while any pool sleeps, pushing
    while the weights sleep, and generating after weights were dropped (a level-2 sleep, or an engine
    built without weights) and no complete push followed.
    """

    def __init__(self, sleep_level: int = 1) -> None:
        self.sleep_level = check_sleep_level(sleep_level)
        self._asleep: set[str] = set()
        self._weights_valid = True

    # backend hooks
    def _survives(self, level: int) -> bool:
        return level == 1

    @abstractmethod
    def _sleep(self, level: int) -> None: ...

    @abstractmethod
    def _wake(self, tags: list[str]) -> None: ...

    @abstractmethod
    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], last_bucket: bool) -> None: ...

    @abstractmethod
    def _generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    # the interface
    @property
    def weights_survive_sleep(self) -> bool:
        return self._survives(self.sleep_level)

    @property
    def is_sleeping(self) -> bool:
        return bool(self._asleep)

    @property
    def weights_valid(self) -> bool:
        """Whether the engine holds a complete set of weights it may generate with."""
        return self._weights_valid

    def sleep(self, level: Optional[int] = None) -> None:
        """Free device memory at ``level`` (default: the engine's ``sleep_level``); a no-op when asleep."""
        level = self.sleep_level if level is None else check_sleep_level(level)
        if self._asleep == set(_POOLS):
            return
        self._sleep(level)
        self._asleep = set(_POOLS)
        if not self._survives(level):
            self._weights_valid = False

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        tags = list(_POOLS) if tags is None else list(tags)
        bad = [t for t in tags if t not in _POOLS]
        if bad:
            raise ValueError(f"wake_up: tags={bad!r} are invalid; accepted: a subset of {list(_POOLS)} or None")
        todo = [t for t in _POOLS if t in tags and t in self._asleep]
        if todo:
            self._wake(todo)
            self._asleep.difference_update(todo)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, last_bucket: bool = True) -> None:
        self._check_weights_awake("update_weights")
        self._load(list(named_tensors), last_bucket)
        if last_bucket:
            self._weights_valid = True

    def _check_weights_awake(self, call: str) -> None:
        if "weights" in self._asleep:
            raise EngineStateError(f"{type(self).__name__}.{call}: the weights are asleep; call wake_up(['weights']) first")

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        name = type(self).__name__
        if self._asleep:
            raise EngineStateError(f"{name}.generate: the engine is asleep ({sorted(self._asleep)}); call wake_up() first")
        if not self.weights_valid:
            raise EngineStateError(
                f"{name}.generate: the engine has no valid weights (dropped by sleep(level=2) or never loaded); "
                "push the actor's weights with update_weights/push_weights first"
            )
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        if not prompts or any(not p for p in prompts):
            raise ValueError(f"{name}.generate: prompt_token_ids must be a non-empty list of non-empty token id lists")
        return self._generate(prompts, params)


def check_sleep_level(level: int) -> int:
    if level not in (1, 2):
        raise ValueError(f"sleep_level={level!r} is invalid; accepted: 1 (weights kept in CPU memory) or 2 (weights dropped)")
    return level


def check_in_flight(mode: str, owner: str) -> str:
    """``mode`` if it is one of :data:`IN_FLIGHT_MODES`; otherwise a ``ValueError`` naming ``owner``."""
    if mode not in IN_FLIGHT_MODES:
        raise ValueError(f"{owner}: in_flight={mode!r} is invalid; accepted: {', '.join(map(repr, IN_FLIGHT_MODES))}")
    return mode


def require_package(package: str, extra: str) -> Any:
    """Import an optional engine package, or say which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{package} is not installed; install it with `pip install 'lightrft-lightning[{extra}]'` "
            "or use the built-in HFEngine"
        ) from err
