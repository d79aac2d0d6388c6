"""Rewards: rule functions named by import path, reward models, and weighted sums of both.

A rule function is ``fn(prompts, completions, metadata) -> list[float]`` where ``metadata[i]`` is the
prompt row minus its prompt (e.g. ``{"answer": "42"}``), given as ``"package.module:function"``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]


def load_function(path: str) -> Callable:
    """Import ``"package.module:function"``."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward {path!r} is not an import path; accepted: 'package.module:function' "
                         "or a local reward-model directory")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {path!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable")
    return fn


def exact_match(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]) -> list[float]:
    """1.0 where the stripped completion equals ``metadata["answer"]``, else 0.0."""
    return [float(c.strip() == str(m["answer"]).strip()) for c, m in zip(completions, metadata)]


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


class CombinedReward(nn.Module):
    """``sum_i weight_i * reward_i``. ``rewards`` maps a spec to its weight; a spec is an import path
    (rule function), a local directory (reward model), or a callable/``RewardModel``."""

    def __init__(self, rewards: Mapping[Any, float]) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("rewards is empty; accepted: a mapping of 'module:function' or a reward-model "
                             "directory to its weight")
        self.fns: list[RewardFn] = []
        self.weights: list[float] = []
        self.models = nn.ModuleList()
        for spec, weight in rewards.items():
            fn = RewardModel(spec) if isinstance(spec, str) and os.path.isdir(spec) else (
                load_function(spec) if isinstance(spec, str) else spec)
            if isinstance(fn, nn.Module):
                self.models.append(fn)
            self.fns.append(fn)
            self.weights.append(float(weight))

    def forward(self, prompts: Sequence[str], completions: Sequence[str],
                metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        total = torch.zeros(len(completions), dtype=torch.float32)
        for fn, weight in zip(self.fns, self.weights):
            values = torch.as_tensor(list(fn(prompts, completions, metadata)), dtype=torch.float32)
            if values.shape != total.shape:
                raise ValueError(f"reward {getattr(fn, '__name__', fn)!r} returned {values.numel()} values "
                                 f"for {len(completions)} completions")
            total += weight * values
        return total
