"""Rewards: rule functions named by import path, reward models, and weighted sums of both.

A rule function is ``fn(prompts, completions, metadata) -> list[float]`` where ``metadata[i]`` is the
prompt row minus its prompt (e.g. ``{"answer": "42"}``), given as ``"package.module:function"``.
"""

from __future__ import annotations

import importlib
import math
import os
from numbers import Real
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]


def load_function(path: str) -> Callable:
    """Import ``"package.module:function"``."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward {path!r} is not an import path; accepted: 'package.module:function' "
                         "or an existing local reward-model directory")
    try:
        mod = importlib.import_module(module)
    except Exception as err:
        raise ValueError(f"reward {path!r} cannot be imported: module {module!r} fails to import "
                         f"({type(err).__name__}: {err})") from err
    if not hasattr(mod, name):
        raise ValueError(f"reward {path!r} cannot be imported: module {module!r} has no attribute {name!r}; "
                         "accepted: 'package.module:function' naming a function of the module")
    fn = getattr(mod, name)
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable (it is a {type(fn).__name__}); accepted: a function "
                         "fn(prompts, completions, metadata) -> list[float]")
    return fn


def answers(metadata: Sequence[dict], reward: str) -> list[str]:
    """``metadata[i]["answer"]`` as strings, for rule reward ``reward``; a clear error when a row has none."""
    missing = [i for i, m in enumerate(metadata) if "answer" not in m]
    if missing:
        raise ValueError(f"{reward} needs an 'answer' field in every prompt row; rows {missing[:8]} have none "
                         f"(their fields: {sorted(metadata[missing[0]])})")
    return [str(m["answer"]) for m in metadata]


def exact_match(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]) -> list[float]:
    """1.0 where the stripped completion equals ``metadata["answer"]``, else 0.0."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answers(metadata, "exact_match"))]


class RewardModel(nn.Module):
    """A sequence-classification reward model (one logit per sequence) scoring prompt + completion.

    Args:
        model: a local Hugging Face directory, or a ``*ForSequenceClassification`` module.
        tokenizer: the model's tokenizer (default: loaded from the directory).
    """

    def __init__(self, model: Union[str, nn.Module], tokenizer: Any = None) -> None:
        super().__init__()
        if isinstance(model, str):
            from transformers import AutoModelForSequenceClassification

            from lightrft_lightning.tokenizer import load_tokenizer

            tokenizer = tokenizer or load_tokenizer(model)
            model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
        if tokenizer is None:
            raise ValueError("RewardModel: a module needs its tokenizer (tokenizer=...)")
        self.model, self.tokenizer = model, tokenizer
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        # right padding: the model scores the last non-pad token
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").to(device)
        return self.model(**enc).logits[:, 0].float().tolist()


def _spec_name(spec: Any) -> str:
    """How errors name a reward: the path the user wrote, or ``module:qualname`` of a callable."""
    if isinstance(spec, str):
        return spec
    target = spec if hasattr(spec, "__qualname__") else type(spec)
    return f"{target.__module__}:{target.__qualname__}"


def _load(spec: Any) -> RewardFn:
    """A reward spec (import path, reward-model directory or callable) as a callable."""
    if isinstance(spec, str):
        if os.path.isdir(spec):
            if not os.path.isfile(os.path.join(spec, "config.json")):
                raise FileNotFoundError(f"reward {spec!r} is a directory without config.json; accepted: a Hugging "
                                        "Face sequence-classification model directory")
            return RewardModel(spec)
        return load_function(spec)
    if not callable(spec):
        raise TypeError(f"CombinedReward.rewards key {spec!r} ({type(spec).__name__}) is invalid; accepted: "
                        "'package.module:function', a local reward-model directory, or a callable "
                        "fn(prompts, completions, metadata) -> list[float]")
    return spec


class CombinedReward(nn.Module):
    """``sum_i weight_i * reward_i``. ``rewards`` maps a spec to its weight (a finite number >= 0); a
    spec is an import path (rule function), a local directory (reward model), or a callable/``RewardModel``.
    A reward that raises, returns the wrong number of scores or a non-finite score fails the call
    with an error naming the spec."""

    def __init__(self, rewards: Mapping[Any, float]) -> None:
        super().__init__()
        if not isinstance(rewards, Mapping):
            raise TypeError(f"CombinedReward.rewards={rewards!r} is invalid; accepted: a mapping of "
                            "'module:function' or a reward-model directory to its weight")
        if not rewards:
            raise ValueError(f"CombinedReward.rewards={rewards!r} is empty; accepted: a mapping of 'module:function' "
                             "or a reward-model directory to its weight")
        self.fns: list[RewardFn] = []
        self.names: list[str] = []
        self.weights: list[float] = []
        self.models = nn.ModuleList()
        for spec, weight in rewards.items():
            name = _spec_name(spec)
            if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"CombinedReward.rewards[{name!r}]={weight!r} is invalid; accepted: a finite "
                                 "number >= 0 (the reward's weight)")
            fn = _load(spec)
            if isinstance(fn, nn.Module):
                self.models.append(fn)
            self.fns.append(fn)
            self.names.append(name)
            self.weights.append(float(weight))

    def forward(self, prompts: Sequence[str], completions: Sequence[str],
                metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        return self.combine(self.scores(prompts, completions, metadata))

    def combine(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of :meth:`scores`."""
        return sum((weight * scores[name] for name, weight in zip(self.names, self.weights)),
                   torch.zeros_like(next(iter(scores.values()))))

    def scores(self, prompts: Sequence[str], completions: Sequence[str],
               metadata: Optional[Sequence[dict]] = None) -> dict[str, torch.Tensor]:
        """Each reward's scores (unweighted), by spec name, in the order of ``rewards``."""
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for fn, name in zip(self.fns, self.names):
            try:
                scores = fn(prompts, completions, metadata)
            except Exception as err:
                raise RuntimeError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
            try:
                values = torch.as_tensor(list(scores), dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"reward {name!r} returned {type(scores).__name__} {scores!r:.80}; accepted: a "
                                "sequence of one number per completion") from err
            if values.shape != total.shape:
                raise ValueError(f"reward {name!r} returned {values.numel()} scores for {len(completions)} "
                                 "completions; accepted: one number per completion")
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"reward {name!r} returned non-finite scores {values[bad[:8]].tolist()} for "
                                 f"completions {bad[:8]}; accepted: finite numbers")
            out[name] = values
        return out

    def short_names(self) -> dict[str, str]:
        """Spec name -> a metric name: the function's or directory's own name, unless two collide."""
        short = {name: name.rsplit(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1] for name in self.names}
        return short if len(set(short.values())) == len(short) else {name: name for name in self.names}
