"""`RefillRollout`: DAPO's dynamic sampling that generates again until the step holds the configured
number of prompt groups with signal (rewards that do not all tie), at fixed batch shapes.

The step's ``B`` prompts (per rank) are generated with ``ceil(B x (batch_multiplier - 1))`` more drawn
from the training sampler; groups whose rewards all tie are dropped; while some rank holds fewer than
``B`` groups with signal, every rank draws more prompts (as many as the shortfall over the fraction
of groups with signal seen so far this step, at most ``B x batch_multiplier``) and generates again,
``max_num_gen_batches`` generations at most. Each rank then holds exactly ``B`` groups: the first
``B`` with signal, in the order they were made; when the rounds (or the epoch's prompts) run out
first, tied groups fill the rest, and the advantages' dynamic-sampling mask leaves them out of the
loss (LightRFT's masking, the other mode). Extra groups with signal are dropped, as verl and NeMo-RL
do. verl and NeMo-RL raise when ``max_num_gen_batches`` runs out; here the step trains on the groups
it has and logs it.

Prompts for the refill come from the DataLoader's :class:`~lightrft_lightning.sampler.ResumableSampler`
(:meth:`~lightrft_lightning.sampler.ResumableSampler.draw`): the same stream as the step's batches, so a
prompt drawn for a refill is not drawn again in the epoch, and the checkpointed position covers it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightrft_lightning.algorithms.advantages import tied_groups
from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.rollout import Rollout
from lightrft_lightning.sampler import training_sampler

DEFAULT_MAX_NUM_GEN_BATCHES = 4
#: Experience fields padded with the pad token (the others with 0) when groups of rounds are joined
_PAD_WITH_TOKEN = ("input_ids",)


def select(exp: Experience, index: Tensor) -> Experience:
    """The samples ``index`` of ``exp`` (every field that is set)."""
    return Experience(**{f.name: (None if getattr(exp, f.name) is None else getattr(exp, f.name)[index])
                         for f in dataclasses.fields(exp)})


def concat(parts: list[Experience], pad_token_id: int) -> Experience:
    """``parts`` one after the other, right-padded to the longest (``input_ids`` with ``pad_token_id``,
    masks and per-token values with 0)."""
    fields: dict[str, Optional[Tensor]] = {}
    for f in dataclasses.fields(Experience):
        values = [getattr(p, f.name) for p in parts]
        if all(v is None for v in values):
            fields[f.name] = None
            continue
        if any(v is None for v in values):
            raise ValueError(f"concat: Experience.{f.name} is set in some parts and not in others")
        width = max(v.shape[1] for v in values) if values[0].dim() > 1 else None
        if width is not None:
            fill = pad_token_id if f.name in _PAD_WITH_TOKEN else 0
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) for v in values]
        fields[f.name] = torch.cat(values)
    return Experience(**fields)


class RefillRollout(Rollout):
    """A :class:`~lightrft_lightning.algorithms.rollout.Rollout` that over-samples prompts and generates
    again until each rank holds as many prompt groups with signal as it got prompts (see the module
    docstring). Needs a DataLoader whose sampler is a :class:`~lightrft_lightning.sampler.ResumableSampler`
    (:class:`~lightrft_lightning.data.PromptDataModule`'s) and ``n_samples_per_prompt >= 2``.

    Logged per step: ``dynamic_sampling/rounds`` (generations), ``dynamic_sampling/signal_fraction``
    (groups with signal in the batch trained: 1.0 unless the rounds ran out),
    ``dynamic_sampling/generated_signal_fraction`` (of all groups generated), ``dynamic_sampling/prompts``
    (prompts generated, per rank) and ``dynamic_sampling/exhausted`` (1.0: tied groups filled the batch).

    Args:
        max_num_gen_batches: generations per step at most (verl's and NeMo-RL's name), >= 1.
        batch_multiplier: the first generation's prompts as a multiple of the step's (NeMo-RL's name),
            and the cap of one refill's; >= 1.
        **kwargs: :class:`~lightrft_lightning.algorithms.rollout.Rollout`'s.
    """

    def __init__(self, max_num_gen_batches: int = DEFAULT_MAX_NUM_GEN_BATCHES, batch_multiplier: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_num_gen_batches, self.batch_multiplier = max_num_gen_batches, batch_multiplier

    def check(self, owner: str) -> None:
        super().check(owner)
        value = self.max_num_gen_batches
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.max_num_gen_batches={value!r} is invalid; accepted: an integer >= 1 "
                             "(generations per step at most)")
        value = self.batch_multiplier
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < float("inf"):
            raise ValueError(f"{owner}.batch_multiplier={value!r} is invalid; accepted: a number >= 1 (finite)")
        if self.n_samples_per_prompt < 2:
            raise ValueError(f"{owner}.n_samples_per_prompt={self.n_samples_per_prompt!r} is invalid with a refilling "
                             "rollout (a group of one sample never has signal); accepted: n_samples_per_prompt >= 2")

    @torch.no_grad()
    def __call__(self, module: pl.LightningModule, rows: list[dict[str, Any]]) -> tuple[Experience, dict[str, float]]:
        sampler = training_sampler(module.trainer, "a refilling rollout (dynamic_sampling_mode='refill') draws more "
                                   "prompts", "dynamic_sampling_mode='mask'")
        n, need = self.n_samples_per_prompt, len(rows)
        global_max = lambda values: module.trainer.strategy.all_reduce(  # noqa: E731
            torch.tensor(values, dtype=torch.float64), op="max")
        cap = math.ceil(need * self.batch_multiplier)
        batch = list(rows) + sampler.draw_rows(cap - need)
        signal: list[Experience] = []
        tied: list[Experience] = []
        totals: dict[str, float] = defaultdict(float)
        generated = with_signal = rounds = 0
        every = self.sample_every_n_steps
        while batch:
            try:
                self.sample_every_n_steps = every if rounds == 0 else 0  # samples.jsonl: the first round's
                exp, metrics = super().__call__(module, batch)
            finally:
                self.sample_every_n_steps = every
            rounds += 1
            for key, value in metrics.items():  # times add up; other metrics are means over samples
                totals[key] += value if key.startswith("time/") else value * len(exp)
            totals["samples"] += len(exp)
            has_signal = ~tied_groups(exp.rewards, n).view(-1, n)[:, 0]
            generated += len(batch)
            with_signal += int(has_signal.sum())
            for g, keep in enumerate(has_signal.tolist()):
                group = select(exp, torch.arange(g * n, (g + 1) * n, device=exp.rewards.device))
                (signal if keep else tied).append(group)
            # every rank takes the same decision: each generates (and draws) as often as the others
            short, signal_seen, groups_seen = global_max(
                [max(need - len(signal), 0), -with_signal, -generated]).tolist()
            if short == 0 or rounds == self.max_num_gen_batches:
                break
            rate = -signal_seen / -groups_seen if groups_seen else 0.0  # the lowest rank's counts: a cautious rate
            batch = sampler.draw_rows(min(cap, math.ceil(short / rate) if rate > 0 else cap))
        kept = signal[:need]
        exhausted = len(kept) < need
        kept += tied[: need - len(kept)]
        out = concat(kept, self.tokenizer.pad_token_id)
        samples = totals.pop("samples")
        metrics = {k: v if k.startswith("time/") else v / samples for k, v in totals.items()}
        metrics["groups/all_tied"] = float(tied_groups(out.rewards, n).float().mean())
        metrics.update({"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/prompts": float(generated),
                        "dynamic_sampling/signal_fraction": 1.0 - metrics["groups/all_tied"],
                        "dynamic_sampling/generated_signal_fraction": with_signal / generated,
                        "dynamic_sampling/exhausted": float(exhausted)})
        return out, metrics
